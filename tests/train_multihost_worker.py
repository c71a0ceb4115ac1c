"""One process of tests/test_train_multihost.py (run as a script, not collected).

    python tests/train_multihost_worker.py RECORD_DIR [training program flags ...]

Runs the training program's `main` with the given flags, as `python -m dapo_jax.train` would (the flags name the
coordinator, the process count and this process's id), and records this process's own copy of the params at
every checkpoint in RECORD_DIR/params_<process>_<step>.npz, assembled from the shards on its devices: the test
checks that the processes ended each step with the same weights, and that these are the checkpoint's.
"""
import os
import sys


def _local_copy(tree) -> dict:
  """Each array of `tree`, by key path, put together from this process's shards; fails if they do not cover it
  (the mesh must replicate the params across processes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    value = np.zeros(leaf.shape, leaf.dtype)
    covered = np.zeros(leaf.shape, bool)
    for shard in leaf.addressable_shards:
      value[shard.index] = np.asarray(shard.data)
      covered[shard.index] = True
    if not covered.all():
      raise AssertionError(f"{jax.tree_util.keystr(path)}: this process holds only part of it ({leaf.sharding})")
    out[jax.tree_util.keystr(path)] = value
  return out


def main(record_dir: str, flags: list[str]) -> None:
  # Importing the program touches no device: `main` joins the other process first, as on the command line.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top

  from dapo_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from dapo_jax import train  # pylint: disable=g-import-not-at-top

  save = checkpoint.Checkpointer.save

  def save_and_record(self, step, items, metadata, **kwargs):
    save(self, step, items, metadata, **kwargs)
    # Copied before the next update donates these buffers.
    np.savez(os.path.join(record_dir, f"params_{jax.process_index()}_{step}.npz"), **_local_copy(items["params"]))

  checkpoint.Checkpointer.save = save_and_record
  app.run(train.main, argv=["dapo_jax.train", *flags])


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main(sys.argv[1], sys.argv[2:])
