"""Training checkpoints: orbax CheckpointManager over the train state and a JSON record of the loop's state.

A checkpoint at rollout step k holds:
  * `state`: the arrays (params, optimizer state), saved asynchronously and sharded as they are on the devices;
  * `meta`: JSON (the rollout-step counter, the rng, the data iterator's state, the dynamic-sampling state,
    and anything else the loop needs to continue exactly as if it had never stopped).
Orbax writes each step to a temporary directory and renames it when complete, so after a crash or a kill the
newest *complete* step is what `latest_step()` returns.
"""
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, metadata) pairs under `directory`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.expanduser(directory)) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict, *, force: bool = False) -> None:
    """Starts saving (asynchronously); the previous save is finished first."""
    start = time.time()
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(metadata)), force=force)
    logging.info("Checkpoint of step %d started in %s (%.1f s to hand off)", step, self.directory,
                 time.time() - start)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """The state at `step`, placed like `abstract_state` (a pytree of jax.ShapeDtypeStruct with shardings)."""
    start = time.time()
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   meta=ocp.args.JsonRestore()))
    logging.info("Restored step %d from %s in %.1f s", step, self.directory, time.time() - start)
    return restored.state, restored.meta

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """Shape, dtype and sharding of each array of `tree`: the target to restore into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                      tree)
