"""Session fixtures of the rollout tests: the parity checkpoints are made and loaded once."""
import pytest

from tests.rollout.rollout_fixtures import Checkpoint, PARITY_CONFIGS, make_qwen_like_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Checkpoint]:
  return {name: Checkpoint(name, tmp_path_factory.mktemp(name)) for name in PARITY_CONFIGS}


@pytest.fixture(scope="session")
def qwen_like_checkpoint(tmp_path_factory) -> Checkpoint:
  return make_qwen_like_checkpoint(tmp_path_factory.mktemp("qwen_like"))
