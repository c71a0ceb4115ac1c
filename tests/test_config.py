"""Shipped configs validate, the Table 1 ladder sets what it says, and bad values name their key."""
import glob
import os
import shlex

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path
import pytest

from dapo_jax import config as config_lib

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
RECIPE_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "dapo_*.py")))
ALL_CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def _key(key: str) -> str:
  return key.replace(".", r"\.")


@pytest.mark.parametrize("path", RECIPE_FILES, ids=os.path.basename)
def test_shipped_recipes_validate_once_data_and_model_are_given(path):
  c = config_lib.load_config_file(path)
  # The data files and the base model are the user's to name: the recipes have no machine-specific paths.
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.train_files: required"):
    config_lib.validate(c)
  c.data.train_files = "/data/dapo-math-17k.parquet"
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.val_files: required"):
    config_lib.validate(c)
  c.data.val_files = "/data/aime-2024.parquet"
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.hf_checkpoint"):
    config_lib.validate(c)
  c.model.hf_checkpoint = "/models/Qwen2.5"
  config_lib.validate(c)


@pytest.mark.parametrize("value, expected", [
    ("a.parquet", ["a.parquet"]),
    ("a.parquet,b.parquet", ["a.parquet", "b.parquet"]),
    (" a.parquet , ~/b.parquet ", ["a.parquet", "~/b.parquet"]),
    ('["a.parquet", "b,c.parquet"]', ["a.parquet", "b,c.parquet"]),  # a comma inside a path: the list form
    ("('a.parquet',)", ["a.parquet"]),
    ("", []),
    (None, []),
])
def test_file_list_forms(value, expected):
  assert config_lib.file_list(value) == expected


@pytest.mark.parametrize("value, message", [
    ("a.parquet,,b.parquet", "has an empty path"),
    ('["a.parquet", 3]', "is not a list of quoted paths"),
    ("[a.parquet]", "is not a list of quoted paths"),  # unquoted inside brackets
    (["a.parquet"], "must be a string"),
])
def test_file_list_errors_name_the_key(value, message):
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.val_files: .*" + message):
    config_lib.file_list(value, key="data.val_files")


def test_resolve_files_fills_in_the_workdir_and_home():
  assert config_lib.resolve_files("{workdir}/data/train.parquet,~/x.parquet", "/runs/a") == [
      "/runs/a/data/train.parquet", os.path.expanduser("~/x.parquet")]


def _parse_command_line(args: list[str]):
  """(config, workdir) as `python -m dapo_jax.train ARGS` parses them (its --config and --workdir flags)."""
  argv = ["dapo_jax.train", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, "default.py"), "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", "./runs/default", "", flag_values=flag_values)
  flag_values(argv)
  return flag_values.config, flag_values.workdir


# A TPU command in the JSON-list form of file lists (the README's own command, with comma-separated files, is
# read from README.md by tests/test_entry_point_errors.py): the gcloud invocation whose --command the remote
# shell runs.
README_TPU_COMMAND = r"""gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd dapo_jax && .venv/bin/python -m dapo_jax.train \
    --config configs/dapo_qwen2_5_32b.py --workdir /mnt/shared/runs/dapo32b --config.distributed.initialize=always \
    --config.model.hf_checkpoint=/mnt/shared/Qwen2.5-32B \
    --config.data.train_files='[\"/mnt/shared/data/dapo-math-17k.parquet\"]' \
    --config.data.val_files='[\"/mnt/shared/data/aime-2024.parquet\"]'"
"""


def _remote_arguments(command: str) -> list[str]:
  """The arguments dapo_jax.train gets from a gcloud command: two rounds of shell quoting (the local shell's,
  then the TPU VM's), line continuations removed first as the shell does."""
  local = shlex.split(command.replace("\\\n", ""))
  remote = shlex.split(next(a for a in local if a.startswith("--command="))[len("--command="):])
  return remote[remote.index("dapo_jax.train") + 1:]


def test_the_readme_tpu_command_parses_to_a_valid_config(monkeypatch):
  monkeypatch.chdir(os.path.join(CONFIG_DIR, ".."))  # the command runs in the repository root
  args = _remote_arguments(README_TPU_COMMAND)
  assert args[-1] == '--config.data.val_files=["/mnt/shared/data/aime-2024.parquet"]'
  config, workdir = _parse_command_line(args)
  assert workdir == "/mnt/shared/runs/dapo32b"
  assert config.distributed.initialize == "always" and config.model.hf_checkpoint == "/mnt/shared/Qwen2.5-32B"
  assert config_lib.file_list(config.data.train_files) == ["/mnt/shared/data/dapo-math-17k.parquet"]
  assert config_lib.file_list(config.data.val_files) == ["/mnt/shared/data/aime-2024.parquet"]
  config_lib.validate(config, num_processes=16)  # a v5p-64 has 16 hosts


def test_comma_separated_files_on_the_command_line(monkeypatch):
  monkeypatch.chdir(os.path.join(CONFIG_DIR, ".."))
  config, _ = _parse_command_line(["--config", "configs/dapo_qwen2_5_7b.py:clip_higher",
                                   "--config.data.train_files=/d/a.parquet,/d/b.parquet",
                                   "--config.data.val_files=/d/aime.parquet", "--config.model.hf_checkpoint=/m"])
  assert config_lib.file_list(config.data.train_files) == ["/d/a.parquet", "/d/b.parquet"]
  assert config.actor.clip_ratio_high == 0.28
  config_lib.validate(config)


def _leaves(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if hasattr(value, "keys"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


# A command-line value for a key of each type, and what it parses to.
_SAMPLE = {str: ("x.parquet", "x.parquet"), int: ("3", 3), float: ("0.5", 0.5), bool: ("false", False)}


@pytest.mark.parametrize("path", ALL_CONFIG_FILES, ids=os.path.basename)
def test_every_key_can_be_set_from_the_command_line(path):
  config = config_lib.load_config_file(path)
  keys = dict(_leaves(config))
  assert not [k for k, v in keys.items() if isinstance(v, (list, tuple, dict))]  # config flags cannot set these
  args, expected = [], {}
  for key in keys:
    text, value = _SAMPLE[config_path.get_type(key, config)]
    args.append(f"--config.{key}={text}")
    expected[key] = value
  parsed, _ = _parse_command_line(["--config", path, *args])
  assert dict(_leaves(parsed)) == expected


def test_full_and_early_dapo_recipes_match_the_spec():
  full = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_qwen2_5_32b.py"))
  assert (full.data.train_batch_size, full.rollout.n, full.actor.ppo_mini_batch_size) == (512, 16, 32)
  assert (full.data.gen_batch_size, full.algorithm.filter_groups.max_num_gen_batches) == (1536, 10)
  assert (full.data.max_prompt_length, full.data.max_response_length) == (2048, 20480)
  assert (full.reward.overlong_buffer.len, full.reward.overlong_buffer.penalty_factor) == (4096, 1.0)
  assert (full.actor.clip_ratio_low, full.actor.clip_ratio_high, full.actor.clip_ratio_c) == (0.2, 0.28, 10.0)
  assert (full.actor.optim.lr, full.actor.optim.warmup_steps, full.actor.optim.weight_decay) == (1e-6, 10, 0.1)
  assert full.actor.loss_agg_mode == "token-mean" and full.algorithm.filter_groups.enable
  assert (full.rollout.val_kwargs.n, full.rollout.val_kwargs.top_p, full.trainer.save_freq) == (32, 0.7, 5)
  early = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_early_qwen2_5_32b.py"))
  assert early.actor.loss_agg_mode == "seq-mean-token-mean"
  assert not early.algorithm.filter_groups.enable and early.data.gen_batch_size == 512


@pytest.mark.parametrize("rung, clip_high, overlong_filter, soft_overlong, agg_mode, dynamic", [
    ("grpo", 0.2, False, False, "seq-mean-token-mean", False),
    ("overlong_filter", 0.2, True, False, "seq-mean-token-mean", False),
    ("clip_higher", 0.28, True, False, "seq-mean-token-mean", False),
    ("soft_overlong", 0.28, False, True, "seq-mean-token-mean", False),
    ("token_level", 0.28, False, True, "token-mean", False),
    ("dapo", 0.28, False, True, "token-mean", True),
])
def test_ablation_ladder(rung, clip_high, overlong_filter, soft_overlong, agg_mode, dynamic):
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_qwen2_5_32b.py"), rung)
  assert (c.actor.clip_ratio_low, c.actor.clip_ratio_high) == (0.2, clip_high)
  assert c.reward.overlong_filter == overlong_filter
  assert c.reward.overlong_buffer.enable == soft_overlong
  assert c.actor.loss_agg_mode == agg_mode
  assert c.algorithm.filter_groups.enable == dynamic


def _valid():
  c = config_lib.base_config()
  c.model.hf_checkpoint = "/models/x"
  c.data.train_files = "/data/train.parquet"
  c.data.val_files = "/data/val.parquet"
  return c


@pytest.mark.parametrize("edit, key", [
    (lambda c: setattr(c.actor, "ppo_mini_batch_size", 30), "config.actor.ppo_mini_batch_size"),
    (lambda c: setattr(c.data, "gen_batch_size", 100), "config.data.gen_batch_size"),
    (lambda c: setattr(c.actor, "loss_agg_mode", "token-sum"), "config.actor.loss_agg_mode"),
    (lambda c: setattr(c.actor, "clip_ratio_c", 1.0), "config.actor.clip_ratio_c"),
    (lambda c: setattr(c.reward.overlong_buffer, "len", 30000), "config.reward.overlong_buffer.len"),
    # As long as the response budget, the buffer would penalise every response from its first token.
    (lambda c: setattr(c.reward.overlong_buffer, "len", c.data.max_response_length),
     "config.reward.overlong_buffer.len"),
    (lambda c: setattr(c.algorithm.filter_groups, "metric", "seq_reward"), "config.algorithm.filter_groups.metric"),
    (lambda c: setattr(c.data, "truncation", "right"), "config.data.truncation"),
    (lambda c: setattr(c.actor, "micro_batch_tokens", 1000), "config.actor.micro_batch_tokens"),
    (lambda c: setattr(c.rollout, "log_prob_micro_batch_tokens", 1000),
     "config.rollout.log_prob_micro_batch_tokens"),
    (lambda c: setattr(c.model, "hf_checkpoint", None), "config.model.hf_checkpoint"),
    (lambda c: setattr(c.data, "train_files", ""), "config.data.train_files"),
    (lambda c: setattr(c.data, "val_files", "a.parquet,,b.parquet"), "config.data.val_files"),
])
def test_inconsistent_values_name_the_key(edit, key):
  c = _valid()
  config_lib.validate(c)
  edit(c)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


@pytest.mark.parametrize("edit, key", [
    (lambda c: setattr(c.distributed, "initialize", "sometimes"), "config.distributed.initialize"),
    (lambda c: setattr(c.distributed, "coordinator_address", "10.0.0.1"), "config.distributed.coordinator_address"),
    (lambda c: setattr(c.distributed, "num_processes", 0), "config.distributed.num_processes"),
    (lambda c: (setattr(c.distributed, "num_processes", 2), setattr(c.distributed, "process_id", 2)),
     "config.distributed.process_id"),
])
def test_distributed_section_names_the_key(edit, key):
  c = _valid()
  c.distributed.coordinator_address = "10.0.0.1:1234"
  c.distributed.num_processes, c.distributed.process_id = 4, 3
  config_lib.validate(c)
  edit(c)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(c)


@pytest.mark.parametrize("processes, key", [(3, "config.data.train_batch_size"),
                                            (64, "config.actor.ppo_mini_batch_size")])
def test_batches_must_divide_between_the_processes(processes, key):
  c = _valid()  # 512 / 1536 / 32: any power of two up to 32 processes
  config_lib.validate(c, num_processes=32)
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.") + r".*divisible by the \d+ processes"):
    config_lib.validate(c, num_processes=processes)


def test_unknown_keys_are_refused_with_a_suggestion():
  c = _valid()
  c.unlock()
  c.actor.clip_ratio_hgh = 0.3
  with pytest.raises(config_lib.ConfigError, match=r"config\.actor\.clip_ratio_hgh: unknown key"):
    config_lib.validate(c)
  c = _valid()
  c.unlock()
  c.trainer.lr = 1e-6
  with pytest.raises(config_lib.ConfigError, match=r"did you mean actor\.optim\.lr"):
    config_lib.validate(c)


def test_unknown_ablation_rung():
  with pytest.raises(config_lib.ConfigError, match="unknown ablation rung 'dynamic'"):
    config_lib.apply_ablation(config_lib.base_config(), "dynamic")


@pytest.mark.parametrize("rung", config_lib.ABLATION_LADDER)
def test_rungs_without_dynamic_sampling_draw_one_train_batch_per_step(rung):
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_qwen2_5_32b.py"), rung)
  if rung == "dapo":
    assert c.algorithm.filter_groups.enable and (c.data.train_batch_size, c.data.gen_batch_size) == (512, 1536)
  else:
    assert not c.algorithm.filter_groups.enable and c.data.gen_batch_size == c.data.train_batch_size == 512


def test_single_host_variant_sizes():
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "dapo_qwen2_5_7b.py"))
  assert (c.data.train_batch_size, c.data.gen_batch_size, c.actor.ppo_mini_batch_size) == (256, 768, 32)
  assert (c.data.max_response_length, c.reward.overlong_buffer.len) == (16384, 3276)
  assert c.actor.micro_batch_tokens == 2 * (2048 + 16384)
  assert c.actor.clip_ratio_high == 0.28 and c.algorithm.filter_groups.enable  # the algorithm is full DAPO


@pytest.mark.parametrize("name", ["dapo_qwen2_5_0_5b.py", "dapo_qwen2_5_1_5b.py", "dapo_qwen2_5_7b.py"])
def test_single_host_recipes_do_not_inherit_the_pod_slice_layout(name):
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, name))
  base = config_lib.base_config()
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (base.mesh.data, base.mesh.fsdp, base.mesh.tensor)
  assert c.rollout.max_num_seqs == base.rollout.max_num_seqs


def test_no_validation_files_is_allowed_when_said_explicitly():
  c = _valid()
  c.data.val_files = ""
  config_lib.validate(c)


def test_compilation_cache_dir_must_not_be_a_file(tmp_path):
  c = _valid()
  assert c.trainer.compilation_cache_dir == "auto"
  (tmp_path / "f").write_text("")
  c.trainer.compilation_cache_dir = str(tmp_path / "f")
  with pytest.raises(config_lib.ConfigError, match=r"config\.trainer\.compilation_cache_dir: .* is a file"):
    config_lib.validate(c)


@pytest.fixture
def inputs(tmp_path):
  """A valid config whose data files and model directory exist under tmp_path."""
  (tmp_path / "train.parquet").write_bytes(b"")
  (tmp_path / "aime.parquet").write_bytes(b"")
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  (model / "model.safetensors").write_bytes(b"")
  c = _valid()
  c.data.train_files = f"{tmp_path}/train.parquet"
  c.data.val_files = "{workdir}/aime.parquet"
  c.model.hf_checkpoint = str(model)
  return c, str(tmp_path), tmp_path


def test_check_inputs_accepts_inputs_that_are_there(inputs):
  c, workdir, _ = inputs
  config_lib.validate(c, workdir=workdir)


@pytest.mark.parametrize("edit, key, message", [
    (lambda c, d: setattr(c.data, "train_files", f"{d}/train.parquet,{d}/missing.parquet"), "data.train_files",
     "missing.parquet: no such file"),
    (lambda c, d: setattr(c.data, "val_files", "{workdir}/data/aime.parquet"), "data.val_files",
     "/data/aime.parquet: no such file"),
    (lambda c, d: setattr(c.model, "hf_checkpoint", f"{d}/nowhere"), "model.hf_checkpoint",
     "nowhere: no such directory"),
    (lambda c, d: setattr(c.model, "hf_checkpoint", str(d)), "model.hf_checkpoint", "has no config.json"),
    (lambda c, d: (d / "model" / "model.safetensors").unlink(), "model.hf_checkpoint", "has no \\*.safetensors"),
    (lambda c, d: setattr(c.trainer, "resume_from", f"{d}/old_run"), "trainer.resume_from",
     "old_run: no such checkpoint"),
])
def test_check_inputs_names_the_key_and_the_path(inputs, edit, key, message):
  c, workdir, directory = inputs
  edit(c, directory)
  config_lib.validate(c)  # without a workdir only the values are checked
  with pytest.raises(config_lib.ConfigError, match=f"config\\.{_key(key)}: .*{message}"):
    config_lib.validate(c, workdir=workdir)


def test_check_inputs_skips_the_files_the_embedded_default_writes(tmp_path):
  c = config_lib.load_config_file(os.path.join(CONFIG_DIR, "default.py"))
  config_lib.validate(c, extra_sections=("synthetic", "warmup"), workdir=str(tmp_path))
  c.data.val_files = "/nowhere/heldout.parquet"  # not the task's own file: checked
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.val_files: /nowhere/heldout\.parquet"):
    config_lib.validate(c, extra_sections=("synthetic", "warmup"), workdir=str(tmp_path))
