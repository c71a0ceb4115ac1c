"""One process of the two-process training step of tests/test_multihost.py (run as a script, not collected).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES COORDINATOR_ADDRESS WORKDIR

The test writes WORKDIR/inputs.npz (this process's share of a mini-batch, as micro-batches of its own shapes)
and a Hugging Face checkpoint WORKDIR/hf. Together the processes load the checkpoint onto a global mesh, place
their rows, compute old log-probs (again on a mesh that make_mesh must lay out process-major, checked equal),
the mini-batch gradients and one DAPO update, save and restore an orbax checkpoint of the train state, and each
samples greedily on its own devices from weights resharded out of the trainer's layout. Process 0 writes
WORKDIR/outputs.npz (everything gathered); each writes its greedy tokens.
"""
import functools
import json
import os
import sys


def main(process_id: int, num_processes: int, coordinator_address: str, workdir: str) -> None:
  # Before JAX touches a device: join the other process.
  from dapo_jax import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.initialize(coordinator_address, num_processes, process_id)

  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from dapo_jax import batch_placement  # pylint: disable=g-import-not-at-top
  from dapo_jax import old_log_probs  # pylint: disable=g-import-not-at-top
  from dapo_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from dapo_jax import sharding  # pylint: disable=g-import-not-at-top
  from dapo_jax.model import hf_io  # pylint: disable=g-import-not-at-top
  from dapo_jax.model import qwen2  # pylint: disable=g-import-not-at-top
  from dapo_jax.rl import batching  # pylint: disable=g-import-not-at-top
  from dapo_jax.rl import step  # pylint: disable=g-import-not-at-top
  from dapo_jax.rollout import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from dapo_jax.rollout.sampling import GREEDY  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == num_processes and jax.process_index() == process_id
  states = distributed.allgather_json({"process": process_id, "carry_over": list(range(process_id * 3))})
  assert states == [{"process": p, "carry_over": list(range(p * 3))} for p in range(num_processes)], states
  settings = json.loads(open(os.path.join(workdir, "settings.json")).read())
  mesh = sharding.make_mesh(settings["mesh"])

  # HF import straight into the global sharding: each process supplies only its own devices' slices.
  config, model = hf_io.load_hf_checkpoint(os.path.join(workdir, "hf"), mesh=mesh)
  params = model.params
  params_shardings = sharding.param_shardings(qwen2.abstract_model(config), mesh)

  inputs = np.load(os.path.join(workdir, "inputs.npz"))
  mine = {}
  for name in inputs.files:
    process, micro, key = name.split("/")
    if int(process) == process_id:
      mine.setdefault(int(micro), {})[key] = inputs[name]
  local_micro_batches = [mine[i] for i in sorted(mine)]
  placed = batch_placement.put_micro_batches(local_micro_batches, mesh)
  loss_config = step.LossConfig(agg_mode=settings["agg_mode"], temperature=settings["temperature"])
  optimizer = step.make_optimizer(learning_rate=settings["learning_rate"])
  opt_state = sharding.init_optimizer_state(optimizer, params, mesh)
  updater = step.Updater.for_state(params, opt_state, optimizer=optimizer, model_config=config,
                                   loss_config=loss_config)
  old_logps = [updater.old_log_probs(params, mb) for mb in placed]

  # The old-log-prob pass in micro-batches of its own budget (3 rows a call; the update's have 2) gives each
  # process the log-probs of its own rows, as one call per update micro-batch does. The processes have
  # different numbers of rows, so they agree on the calls.
  rng = np.random.default_rng(process_id)
  count = 7 if process_id == 0 else 3
  prompts = [rng.integers(1, config.vocab_size, rng.integers(1, 6)).tolist() for _ in range(count)]
  responses = [rng.integers(1, config.vocab_size, rng.integers(1, 9)).tolist() for _ in range(count)]
  [packed] = batching.training_batches(prompts, responses, [np.zeros(len(r), np.float32) for r in responses],
                                       np.ones(count, np.float32), np.zeros(count, bool), rows_per_update=count,
                                       micro_batch_tokens=2 * 16, pad_id=0, max_prompt_width=5, max_response_width=11)
  old_log_probs.add_old_log_probs([packed], functools.partial(updater.old_log_probs, params),
                                  micro_batch_tokens=3 * 16, mesh=mesh)
  expected = [batch_placement.process_rows(updater.old_log_probs(params, mb)) for mb in
              batch_placement.put_micro_batches([{k: v for k, v in mb.items() if k != "old_logp"} for mb in packed],
                                                mesh)]
  for mb, want in zip(packed, expected):
    rows, width = mb["old_logp"].shape
    np.testing.assert_allclose(mb["old_logp"], want[:rows, :width], rtol=1e-5, atol=1e-6)

  # Devices listed so that jax's own layout would give every tensor pair one device of each process (as jax lays
  # a tensor axis of 4 across two v5p hosts): make_mesh lays the mesh out process-major instead, each process
  # places its own rows on it, and the old log-probs are those of the mesh above.
  by_process = [sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                for p in range(num_processes)]
  interleaved = [d for same_position in zip(*by_process) for d in same_position]
  crossed, layout = sharding.mesh_and_layout({"data": 1, "fsdp": -1, "tensor": 2}, devices=interleaved)
  assert layout.startswith("process-major") and sharding.rows_split_between_processes(crossed), layout
  assert all(len({d.process_index for d in pair}) == 1 for pair in crossed.devices.reshape(-1, 2))
  crossed_params = jax.device_put(params, sharding.param_shardings(qwen2.abstract_model(config), crossed))
  crossed_updater = step.Updater(optimizer=optimizer, model_config=config, loss_config=loss_config,
                                 params_shardings=step.mesh_shardings(crossed_params))
  crossed_logps = [crossed_updater.old_log_probs(crossed_params, mb)
                   for mb in batch_placement.put_micro_batches(local_micro_batches, crossed)]
  for ours, theirs in zip(multihost_utils.process_allgather(old_logps, tiled=True),
                          multihost_utils.process_allgather(crossed_logps, tiled=True)):
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
  del crossed_params, crossed_logps

  grads, _ = updater.gradients(params, placed)
  gathered_before = multihost_utils.process_allgather((params, opt_state, grads), tiled=True)
  params, opt_state, metrics = updater(params, opt_state, placed, learning_rate=settings["learning_rate"])
  for leaf, target in zip(jax.tree.leaves(params), jax.tree.leaves(params_shardings)):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (leaf.sharding, target)

  # Orbax with globally sharded arrays: every process writes its shards, process 0 the metadata.
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  checkpointer.save(1, {"params": params, "opt_state": opt_state}, {"rollout_step": 1})
  checkpointer.wait()
  restored, meta = checkpointer.restore(1, checkpoint_lib.abstract_like({"params": params,
                                                                        "opt_state": opt_state}))
  checkpointer.close()
  assert meta == {"rollout_step": 1}
  for ours, theirs in zip(jax.tree.leaves((params, opt_state)),
                          jax.tree.leaves((restored["params"], restored["opt_state"]))):
    assert ours.sharding.is_equivalent_to(theirs.sharding, ours.ndim), (ours.sharding, theirs.sharding, ours.shape)
    for a, b in zip(ours.addressable_shards, theirs.addressable_shards):
      np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))

  # Each process samples on its own devices, from weights moved out of the trainer's global layout.
  local_mesh = sharding.process_local_mesh({"data": 1, "fsdp": 1, "tensor": -1})
  sampler_params = sharding.reshard(
      params, sharding.param_shardings(qwen2.abstract_model(config), local_mesh, sharding.DECODE_RULES))
  sampler = sampler_lib.GroupSampler(config, num_slots=2, max_prompt_length=8,
                                     max_response_length=settings["new_tokens"], mesh=local_mesh)
  prompt = settings["prompts"][process_id]
  group = sampler.sample(sampler_params, [prompt], n=1, seed=0, sampling=GREEDY)[0]
  with open(os.path.join(workdir, f"greedy_{process_id}.json"), "w") as f:
    json.dump(group.responses[0].token_ids.tolist(), f)

  gathered_after = multihost_utils.process_allgather((params, opt_state, metrics, old_logps), tiled=True)
  if distributed.is_primary():
    out = {}
    for prefix, tree in (("before", gathered_before), ("after", gathered_after)):
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[f"{prefix}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    np.savez(os.path.join(workdir, "outputs.npz"), **out)
  distributed.sync("outputs written")
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
