"""Makes JetStream 0.2.2 (`google-jetstream`, the release on PyPI) run on jax 0.10. Import it before `jetstream`.

JetStream 0.2.2's orchestrator frees each prefix after inserting it with `jax.tree_map`, which jax has removed
(it is `jax.tree.map` now; jax 0.10 has no `jax.tree_map` at all). Without the alias the orchestrator's generate
thread raises on the first insert, and JetStream's thread wrapper then SIGKILLs the whole process. The alias is
the only change needed for the orchestrator and gRPC server to run.

This is the one place the project patches a dependency; `dapo_jax.rollout.engine` and `dapo_jax.serve` import
it first thing. Delete it once JetStream stops calling `jax.tree_map`.
"""
import jax

if not hasattr(jax, "tree_map"):
  jax.tree_map = jax.tree.map
