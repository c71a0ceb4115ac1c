"""dapo_jax: DAPO (Decoupled Clip and Dynamic sAmpling Policy Optimization) in JAX."""
