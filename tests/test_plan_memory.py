"""The memory planner: its parsing and shapes on their own, and scripts/plan_memory.py compiling a tiny config
for a TPU topology (which needs libtpu, `requirements-tpu.txt`)."""
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys
import warnings

import pytest

from dapo_jax import config as config_lib
from dapo_jax.planner import inputs as plan_inputs
from dapo_jax.planner import programs as plan_programs

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30


def _program(plan, name):
  return {r["name"]: r for r in plan["programs"]}[name]


def test_sizes_and_out_of_memory_messages_parse():
  assert plan_programs.parse_size("95.74G") == int(95.74 * GIB)
  assert plan_programs.parse_size("512.00M") == 512 << 20
  assert plan_programs.parse_size("1.00T") == 1 << 40
  assert plan_programs.parse_size("17B") == 17
  assert plan_programs.parse_size("lots") is None
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(96.63G) exceeds available HBM (95.74G).")
  assert plan_programs.parse_out_of_memory(message) == (int(96.63 * GIB), int(95.74 * GIB))
  message = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm."
  assert plan_programs.parse_out_of_memory(message) == (int(20.5 * GIB), int(15.75 * GIB))
  assert plan_programs.parse_out_of_memory("RESOURCE_EXHAUSTED: something else") == (None, None)


def test_worst_case_micro_batch_follows_the_token_budget_and_pads_rows_to_the_data_parallel_size():
  c = config_lib.load_config_file(str(REPO / "configs" / "default.py"))
  # The bucket 64 capped at the longest trajectory, as train.py packs: rows of 20 + 40 = 60 tokens, one
  # full-length trajectory each.
  c.data.max_prompt_length, c.data.max_response_length = 20, 40
  c.actor.micro_batch_tokens = 60 * 5
  batch = plan_inputs.worst_case_micro_batch(c)
  assert batch["input_ids"].shape == batch["segment_ids"].shape == (5, 60)
  assert batch["response_mask"].sum() == 5 * 40 and (batch["segment_ids"] == 1).all()
  assert batch["advantages"].shape == batch["old_logp"].shape == batch["sampler_logp"].shape == (5, 60)
  assert plan_inputs.worst_case_micro_batch(c, data_parallel=4)["input_ids"].shape == (8, 60)
  assert plan_inputs.micro_batch_rows(c) == 5
  c.actor.micro_batch_tokens = 59  # less than one row: a row still gets a micro-batch of its own
  assert plan_inputs.micro_batch_rows(c) == 1
  # The old-log-prob pass's budget: 12 rows of 60 (of the mini-batch's 16 x 8 = 128).
  c.rollout.log_prob_micro_batch_tokens = 60 * 12 + 59
  budget = config_lib.log_prob_micro_batch_tokens(c)
  assert plan_inputs.micro_batch_rows(c, budget=budget) == 12
  assert plan_inputs.worst_case_micro_batch(c, data_parallel=8, budget=budget)["input_ids"].shape == (16, 60)


def test_worst_case_micro_batch_stacks_every_hosts_rows():
  """train.py gives each of P processes ppo_mini_batch_size / P groups of a mini-batch, packs them into
  micro-batches by the token budget, and put_micro_batches pads each process's rows to its row blocks and
  stacks the processes' rows."""
  c = config_lib.load_config_file(str(REPO / "configs" / "default.py"))
  c.data.max_prompt_length, c.data.max_response_length = 20, 40
  c.actor.ppo_mini_batch_size, c.rollout.n = 16, 8  # a mini-batch of 128 rows: 64 on each of 2 hosts
  c.actor.micro_batch_tokens = 60 * 5
  assert plan_inputs.micro_batch_rows(c, num_processes=2) == 5
  # 4 row blocks, 2 on each host: each host's 5 rows padded to 6, stacked over the 2 hosts.
  assert plan_inputs.global_micro_batch_rows(c, data_parallel=4, num_processes=2) == 12
  assert plan_inputs.worst_case_micro_batch(c, data_parallel=4, num_processes=2)["input_ids"].shape == (12, 60)
  # A budget larger than a host's share: each host's whole share (64 rows) is one micro-batch.
  c.actor.micro_batch_tokens = 60 * 100
  assert plan_inputs.micro_batch_rows(c) == 100 and plan_inputs.micro_batch_rows(c, num_processes=2) == 64
  assert plan_inputs.global_micro_batch_rows(c, data_parallel=4, num_processes=2) == 128
  # The 32B recipe on v5p:4x4x4: 16 hosts, 2 groups (32 rows) each; its budget of four full-length rows makes
  # micro-batches of four rows per host, four per data-parallel shard (fsdp 16).
  big = config_lib.load_config_file(str(REPO / "configs" / "dapo_qwen2_5_32b.py"))
  assert big.actor.micro_batch_tokens == 4 * (2048 + 20480)
  assert plan_inputs.micro_batch_rows(big, num_processes=16) == 4
  # Its old-log-prob pass takes 32 full-length rows a call: a host's whole share on 16 hosts.
  assert plan_inputs.micro_batch_rows(big, num_processes=16, budget=config_lib.log_prob_micro_batch_tokens(big)) == 32
  assert plan_inputs.global_micro_batch_rows(big, data_parallel=16, num_processes=16) == 64
  with pytest.raises(ValueError, match="cannot split 6 blocks of batch rows"):
    plan_inputs.global_micro_batch_rows(c, data_parallel=6, num_processes=4)


def test_config_errors_for_a_number_of_hosts():
  c = config_lib.load_config_file(str(REPO / "configs" / "dapo_qwen2_5_32b.py"))
  assert plan_inputs.config_error(c, "qwen2.5-32b", 32) is None  # v5p-256: 32 hosts share 32-prompt mini-batches
  error = plan_inputs.config_error(c, "qwen2.5-32b", 64)  # v5p-512: 64 hosts cannot
  assert error.startswith("config.actor.ppo_mini_batch_size")
  assert c.model.preset is None  # the check works on a copy


def test_model_shape_from_config_file_names():
  assert plan_inputs.model_from_file_name("configs/dapo_qwen2_5_32b.py") == "qwen2.5-32b"
  assert plan_inputs.model_from_file_name("configs/dapo_early_qwen2_5_32b.py") == "qwen2.5-32b"
  assert plan_inputs.model_from_file_name("configs/dapo_qwen2_5_0_5b.py") == "qwen2.5-0.5b"
  assert plan_inputs.model_from_file_name("configs/default.py") is None


def test_forward_flops_by_hand():
  from dapo_jax.model.config import get_preset  # pylint: disable=g-import-not-at-top
  mc = get_preset("tiny-demo")  # hidden 128, mlp 384, 4 layers, 4 heads of 32, 2 KV heads, vocab 32
  layer = 128 * (2 * 128 + 2 * 64) + 3 * 128 * 384
  # 2 rows of 10 tokens, the head on 3 positions each, attention over the full 10 x 10 rectangle.
  expected = 2 * (2 * 4 * layer * 10 + 2 * 128 * 32 * 3 + 4 * 4 * 4 * 32 * 10 * 10)
  assert plan_inputs.forward_flops(mc, 2, 10, 3) == expected


def test_concurrent_sequences_by_hand():
  """Pages of 16 entries, prompts of 32 tokens (2 full pages, shared by a group's 8 samples), responses of 24: each
  sequence's own pages are ceil(56 / 16) - 2 = 2, a group of 8 takes 2 + 8 x 2 = 18 pages."""
  count = functools.partial(plan_inputs.concurrent_sequences, page_size=16, prompt_length=32, response_length=24,
                            group_size=8)
  # 100 pages: 5 whole groups (90 pages, 40 sequences); the 10 left hold the shared 2 and 4 more samples.
  assert count(num_slots=256, page_shards=1, pages_per_shard=100) == 44
  assert count(num_slots=40, page_shards=1, pages_per_shard=100) == 40  # the slots bound it
  assert count(num_slots=256, page_shards=1, pages_per_shard=19) == 8  # 1 page left: not even the shared ones
  assert count(num_slots=256, page_shards=1, pages_per_shard=107) == 47  # 17 left: the shared 2 and 7 samples
  # Two page shards of 100 pages, 32 slots each: the slots bound each shard.
  assert count(num_slots=64, page_shards=2, pages_per_shard=100) == 64
  assert count(num_slots=512, page_shards=2, pages_per_shard=100) == 88
  # A prompt that ends inside a page shares its full pages only: 40 tokens share 2 pages and each sequence's own
  # are ceil(64 / 16) - 2 = 2, as above.
  assert plan_inputs.concurrent_sequences(num_slots=256, page_shards=1, pages_per_shard=100, page_size=16,
                                          prompt_length=40, response_length=24, group_size=8) == 44
  # The 32B recipe's shapes: pages of 128, prompts of 2048 (16 shared pages), responses of 4096 (32 own pages), groups
  # of 16 (528 pages): 4416 pages hold 8 groups and 5 samples of a ninth.
  assert plan_inputs.concurrent_sequences(num_slots=256, page_shards=1, pages_per_shard=4416, page_size=128,
                                          prompt_length=2048, response_length=4096, group_size=16) == 133


def _libtpu_missing_reason() -> str | None:
  if importlib.util.find_spec("libtpu") is None:
    return ("libtpu is not installed (pip install -r requirements-tpu.txt; scripts/setup.sh --test installs it "
            "where pip can), so no TPU program can be compiled here")
  return None


@pytest.fixture(scope="module")
def tiny_plan():
  """scripts/plan_memory.py --json on the tiny default config for a v5p slice of 2 hosts x 4 chips (the trainer
  on all 8, each host sampling on its own 4), with so many decode slots, and a KV pool sized to take all of each
  chip's free memory, that the rollout cannot fit while the update does; concurrency counted for responses of
  100 tokens, longer than the config's longest (40)."""
  reason = _libtpu_missing_reason()
  if reason:
    warnings.warn(reason)  # shown in pytest's summary even without -rs
    pytest.skip(reason)
  command = [sys.executable, str(REPO / "scripts" / "plan_memory.py"), "--config", str(REPO / "configs" / "default.py"),
             "--topology", "v5p:2x2x2", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
             f"--config.rollout.max_num_seqs={1 << 20}", "--config.rollout.gpu_memory_utilization=1.0",
             f"--config.actor.micro_batch_tokens={63 * 72}", f"--config.rollout.log_prob_micro_batch_tokens={16 * 72}",
             "--mean_response_length=100", "--json"]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  (plan,) = json.loads(result.stdout)
  return plan


def test_plan_reports_per_chip_bytes_that_add_up(tiny_plan):
  p = tiny_plan
  assert (p["topology"], p["num_devices"], p["num_processes"], p["device_kind"]) == ("v5p:2x2x2", 8, 2, "TPU v5")
  assert p["hbm_source"] == "compiler" and 90 * GIB < p["hbm_bytes"] <= 96 * GIB
  assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and p["model"] == "tiny-demo"
  assert p["sampler_mesh"] == {"data": 1, "fsdp": 1, "tensor": 4} and p["rows_split_between_hosts"]
  assert p["config_error"] is None
  chip = p["per_chip"]
  assert all(v > 0 for v in chip.values()), chip
  # float32 weights spread over 8 chips (the tiny model's small vectors are replicated, so a little more than an
  # eighth each); Adam's two moments like the params; float32 gradients like the params.
  total = p["num_params"] * 4
  assert total / 8 <= chip["params"] < total / 4
  assert 2 * chip["params"] <= chip["optimizer_state"] <= 2 * chip["params"] + 1024
  assert chip["gradients"] == chip["params"]
  # Each host samples on its own chips: the interim copy of the params the decode weights are made from is tensor
  # parallel over the host's 4 chips (the 2 KV heads, which 4 does not divide, whole), and so are the decode weights.
  assert total / 4 <= chip["sampler_params"] < total
  assert total / 4 <= chip["decode_weights"] < total
  mb = p["micro_batch"]
  # Each host's share of a mini-batch is 8 groups x 8 = 64 rows, of which 63 packed rows of 32 + 40 tokens fill the
  # budget; put_micro_batches pads them to 64 for the host's 2 of the 4 data-parallel shards and stacks the
  # 2 hosts' rows: 128 rows, 2 of them padding.
  assert (mb["mini_batch_rows_per_host"], mb["rows_per_host"], mb["micro_batches_per_update"]) == (64, 63, 2)
  assert (mb["rows"], mb["padding_rows"], mb["width"]) == (128, 2, 72)
  assert mb["tokens"] == 128 * 72 and (mb["rows_per_device"], mb["data_parallel"]) == (32, 4)
  assert mb["log_prob_rows"] == 2 * 16  # the old-log-prob pass's own budget: 16 rows a host
  assert p["mesh_layout"].startswith("jax.make_mesh's physical layout")

  programs = {r["name"]: r for r in p["programs"]}
  assert set(programs) == {"decode_weights", "prefill", "decode_steps", "old_log_probs", "micro_batch_gradients",
                           "apply"}
  for name, r in programs.items():
    assert r["compile_seconds"] > 0, name
    if r["fits"]:
      # Arguments stay live for the whole program (the compiler's peak also counts tile padding and code).
      assert 0 < r["argument_bytes"] <= r["peak_bytes"], name
  grads = programs["micro_batch_gradients"]
  assert grads["argument_bytes"] >= chip["params"] and grads["output_bytes"] >= chip["gradients"]
  apply = programs["apply"]
  assert apply["argument_bytes"] >= chip["params"] + chip["optimizer_state"] + chip["gradients"]
  assert apply["alias_bytes"] >= chip["params"] + chip["optimizer_state"]  # updated in place (donated)
  assert programs["decode_weights"]["argument_bytes"] >= chip["sampler_params"]
  assert programs["decode_weights"]["output_bytes"] == chip["decode_weights"]
  assert programs["prefill"]["argument_bytes"] >= chip["decode_weights"]  # prefill reads the decode weights
  # The gradients' forward and backward over 128 rows; the old log-probs' forward over their 32.
  assert programs["old_log_probs"]["flops"] > 0 and grads["flops"] == 3 * 4 * programs["old_log_probs"]["flops"]


def test_plan_sizes_the_kv_pool_as_the_training_program_does(tiny_plan):
  """The pool takes gpu_memory_utilization (here all) of each chip's free memory beside the trainer's params and
  optimizer state, after the decode weights, in whole pages; each host's sampler holds it all (its slots on its
  own 4 chips, one page shard), and the concurrency is counted at the longest response when the mean asked for
  is longer."""
  p = tiny_plan
  chip, ro = p["per_chip"], p["rollout"]
  assert (ro["decode_rows_per_host"], ro["steps_per_call"], ro["page_size"], ro["page_shards"]) == (1 << 20, 8, 16, 1)
  assert (ro["cache_length"], ro["pages_per_slot"], ro["prefill_rows"], ro["prefill_width"]) == (72, 5, 256, 32)
  # A page on each chip: 4 layers x (keys, values) x both KV heads x 16 entries x 32 x 4 bytes.
  assert ro["page_bytes_per_chip"] == 4 * 2 * 2 * 16 * 32 * 4
  free = p["hbm_bytes"] - chip["params"] - chip["optimizer_state"] - chip["decode_weights"]
  assert (ro["sized_by"], ro["memory_utilization"], ro["free_bytes_per_chip_at_sizing"]) == (
      "gpu_memory_utilization", 1.0, free)
  assert ro["pages"] == ro["pages_per_host"] == free // ro["page_bytes_per_chip"]
  assert ro["pool_bytes_per_chip"] == ro["pages"] * ro["page_bytes_per_chip"]
  assert ro["pool_bytes_per_chip"] <= chip["kv_pool"] <= ro["pool_bytes_per_chip"] + 64 * ro["decode_rows_per_host"]
  assert ro["pool_gib_per_chip"] == round(ro["pool_bytes_per_chip"] / GIB, 2)
  assert ro["weight_bytes_per_chip"] == chip["decode_weights"] and ro["pool_error"] is None
  # Responses of 40 tokens (not 100): 2 full prompt pages a group of 8 shares, ceil(72 / 16) - 2 = 3 pages each.
  assert (ro["mean_response_length"], ro["counted_response_length"]) == (100, 40)
  groups, left = divmod(ro["pages"], 2 + 8 * 3)
  assert ro["concurrent_sequences_per_host"] == 8 * groups + max(0, (left - 2) // 3) < 1 << 20


def test_plan_reports_what_does_not_fit_with_the_compilers_numbers(tiny_plan):
  p = tiny_plan
  decode = _program(p, "decode_steps")
  assert not decode["fits"] and "RESOURCE_EXHAUSTED" in decode["error"]
  assert decode["available_bytes"] == p["hbm_bytes"] < decode["required_bytes"]
  assert p["per_chip"]["kv_pool"] <= decode["required_bytes"]
  phases = {ph["name"]: ph for ph in p["phases"]}
  for name, ph in phases.items():
    program = _program(p, ph["program"])
    program_peak = program["peak_bytes"] if program["fits"] else program["required_bytes"]
    assert ph["peak_bytes"] == sum(ph["resident"].values()) + program_peak, name
    assert ph["fits"] == (program["fits"] and ph["peak_bytes"] <= p["hbm_bytes"]), name
  # The pool stays beside the prefill and is the decode steps' argument; the update phases do not hold it (it is
  # freed before the update).
  assert phases["rollout: prefill"]["resident"]["kv_pool"] == p["per_chip"]["kv_pool"]
  assert all("kv_pool" not in ph["resident"] for name, ph in phases.items() if name != "rollout: prefill")
  # The prefill itself fits, but not beside the pool; the update side fits.
  assert _program(p, "prefill")["fits"] and not phases["rollout: prefill"]["fits"]
  assert phases["micro-batch gradients"]["fits"] and phases["optimizer update"]["fits"]
  assert not p["fits"] and p["peak_phase"] == "rollout: decode steps"
  assert p["peak_bytes"] == max(ph["peak_bytes"] for ph in p["phases"])


def test_reports_show_the_rollout_and_its_pool(tiny_plan):
  """The text report and the README's summary table, from the plan of the fixture."""
  from dapo_jax.planner import report as plan_report  # pylint: disable=g-import-not-at-top
  fields = dict(tiny_plan)
  fields["programs"] = [plan_programs.ProgramMemory(**{k: v for k, v in r.items() if k != "fits"})
                        for r in fields["programs"]]
  fields["phases"] = [plan_programs.Phase(**ph) for ph in fields["phases"]]
  plan = plan_programs.Plan(**fields)
  ro = tiny_plan["rollout"]
  text = plan_report.format_plan(plan)
  assert f"KV pool: {ro['pages']} pages of 16 entries, {ro['pool_gib_per_chip']:.2f} GiB per chip" in text
  assert "gpu_memory_utilization 1 of the" in text
  assert f"concurrent sequences per host: {ro['concurrent_sequences_per_host']} of max_prompt_length + 40" in text
  assert "DOES NOT FIT" in text
  header, rule, row = plan_report.format_summary([plan]).splitlines()
  assert header.count("|") == rule.count("|") == row.count("|") == 12
  assert "KV pool GiB per chip (pages x entries)" in header and "concurrent sequences per host" in header
  assert (f"| {1 << 20} (8) | {ro['pool_gib_per_chip']:.2f} ({ro['pages']} x 16) | "
          f"{ro['concurrent_sequences_per_host']} (40) |") in row


def test_planned_meshes_keep_tensor_groups_within_a_host():
  """A v5p host is a 2x2 block of chips: the planner lays meshes out as sharding.make_mesh does (a host-local
  tensor axis of 4 process-major on v5p:4x4x8), and a tensor axis of 8, which would span hosts, is refused."""
  reason = _libtpu_missing_reason()
  if reason:
    pytest.skip(reason)
  code = """
import os
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
from jax.experimental import topologies
from dapo_jax import sharding
from dapo_jax.planner import inputs as plan_inputs
for topology, shape in (("v5p:4x4x8", (1, 32, 4)), ("v5p:4x4x8", (1, 128, 1)), ("v5p:2x2x2", (1, 2, 4)),
                        ("v5p:4x4x8", (1, 16, 8))):
  devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
  try:
    mesh, layout = plan_inputs.mesh_for(devices, dict(zip(sharding.MESH_AXES, shape)))
  except ValueError as error:
    print("refused:", str(error).split(":")[1].strip())
    continue
  print(plan_inputs.num_processes_of(devices), sharding.rows_split_between_processes(mesh), layout.split(",")[0])
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == [
      "32 True process-major layout", "32 True jax.make_mesh's physical layout",
      "2 True jax.make_mesh's physical layout", "refused: mesh.tensor (8) must divide each process's 4 devices"]
