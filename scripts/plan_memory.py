"""Plans a training config's per-chip memory on TPU slices, on any host (no TPU needed).

    .venv/bin/pip install -r requirements-tpu.txt     # libtpu: XLA's TPU compiler (a large download)
    .venv/bin/python scripts/plan_memory.py --config configs/dapo_qwen2_5_32b.py \
        --topology v5p:4x4x4 --topology v5p:4x4x2 [--json]

Compiles the rollout step's device functions (decode weights, prefill, decode steps, old log-probs,
micro-batch gradients, optimizer update) for each topology with the config's mesh, shapes and shardings, and
reports per-chip params, optimizer state, gradients, decode weights, the rollout's KV pool, each program's
arguments / outputs / temporaries, the peak of each phase of a rollout step and whether it fits the chip's HBM
(`dapo_jax/planner/`). The KV pool is `rollout.num_pages` pages, else sized as the training program sizes it at
start (`rollout.gpu_memory_utilization` of each chip's free memory beside the trainer's params and optimizer
state, after the rollout's decode weights); the plan says how many sequences of max_prompt_length +
`--mean_response_length` tokens (default 4096) each host decodes at once: no more than its decode rows
(`rollout.max_num_seqs`), nor than its pool holds (a group's full prompt pages shared by its samples).
Topologies are named as jax names them: `v5p:4x4x4` is a v5p-128 (64 chips), `v5e:4x4` a v5litepod-16,
`v6e:4x4` a v6e-16. Override config values with `--config.KEY=VALUE` (e.g. `--config.mesh.tensor=2
--config.actor.micro_batch_tokens=45056`). The model shape is the config's
`model.preset` or `model.hf_checkpoint` config.json, else `--model`, else the Qwen2.5 size in the config's
file name (configs/dapo_qwen2_5_32b.py: qwen2.5-32b). The mesh is laid out as the training program lays it
(`sharding.make_mesh`: on several hosts, tensor within a host) and the micro-batch is the one every host's
share of a mini-batch makes (hosts = the topology's processes, 4 chips each on v5p).
"""
import json
import os
import pathlib
import sys

# The host's own accelerator (if any) stays free: only the TPU compiler is used, through compile-only devices,
# so neither is libtpu's one-process-per-host lock needed (it would keep two plans, or a plan and a TPU job,
# from running at once).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from dapo_jax.planner import inputs as plan_inputs
from dapo_jax.planner import programs as plan_programs
from dapo_jax.planner import report as plan_report
# pylint: enable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (path[:arg]).", lock_config=False)
_TOPOLOGIES = flags.DEFINE_multi_string("topology", None, "TPU topology, e.g. v5p:4x4x4 (repeatable).")
_MODEL = flags.DEFINE_string("model", None, "Model preset or Hugging Face directory (default: from the config).")
_MEAN_RESPONSE_LENGTH = flags.DEFINE_integer(
    "mean_response_length", plan_programs.DEFAULT_MEAN_RESPONSE_LENGTH,
    "Mean response length (tokens) the rollout's concurrent sequences are counted for: how many sequences of "
    "max_prompt_length + this many tokens the KV pool holds at once, and the decode rows allow.", lower_bound=1)
_JSON = flags.DEFINE_bool("json", False, "Print the plans as JSON instead of text.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  config = _CONFIG.value
  model = _MODEL.value
  if model is None:
    try:
      plan_inputs.model_config(config)
    except ValueError as error:
      config_path = flags.FLAGS["config"].config_filename
      model = plan_inputs.model_from_file_name(config_path)
      if model is None:
        raise app.UsageError(f"{error} (--model)") from None
      print(f"Model shape: {model}, from the config file's name (--model overrides)", file=sys.stderr)
  plans, failures = [], []
  for topology in _TOPOLOGIES.value:
    try:
      plans.append(plan_programs.plan(config, topology, model=model,
                                      mean_response_length=_MEAN_RESPONSE_LENGTH.value))
    except ValueError as error:  # e.g. a mesh that cannot be laid out on this slice
      failures.append({"topology": topology, "error": str(error)})
      print(f"{topology}: {error}", file=sys.stderr, flush=True)
      continue
    if not _JSON.value:
      print(plan_report.format_plan(plans[-1]), flush=True)
  if _JSON.value:
    print(json.dumps([p.to_json() for p in plans] + failures, indent=1))
  elif len(plans) > 1:
    print("\n" + plan_report.format_summary(plans))
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)
