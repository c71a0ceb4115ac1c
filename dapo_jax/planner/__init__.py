"""Per-chip memory of a training config on a TPU slice, planned on any host by ahead-of-time compilation.

With libtpu installed (`requirements-tpu.txt`), XLA's TPU compiler builds programs for a slice that is not
attached (`jax.experimental.topologies`). Each device function of a rollout step is compiled here exactly as
the training program calls it, with the config's worst-case shapes and the program's shardings:

  rollout: `decode_weights`, `prefill` (a full prefill batch of the longest prompt bucket) and `decode_steps`
           (the config's decode slots over the paged KV pool, with a page table of full-length rows), from
           `dapo_jax/rollout/decoding.py` through a `GroupSampler` built as `rollout_collection.make_sampler`
           builds it, on the sampler's mesh (the trainer's on one host; with several hosts each samples on its
           own chips, tensor parallel, as `train.py` does). The decode weights are the rollout's one copy of the
           weights (`sharding.decode_rules`, in the compute dtype), made from the trainer's params (with several
           hosts, from an interim copy moved onto each host's chips). The pool is `rollout.num_pages` pages, else
           sized as the training program sizes it at start (`GroupSampler.pages_for_memory` of each chip's HBM
           less the trainer's params and optimizer state and the decode weights); it is held from the decode
           weights on and freed before the update. The plan counts the sequences of max_prompt_length + a mean
           response length that one host decodes at once (`inputs.concurrent_sequences`);
  update:  the old log-probs, gradients and apply programs of `dapo_jax/rl/step.Updater`, on the
           packed micro-batch that `batching.training_batches` makes when every trajectory
           of a mini-batch has the longest prompt and response: on each host its share of the mini-batch
           (actor.ppo_mini_batch_size / hosts groups) split by actor.micro_batch_tokens, every host's rows
           stacked into one global micro-batch as `batch_placement.put_micro_batches` does (hosts = the distinct
           `process_index` of the topology's devices); the mesh is laid out as `sharding.make_mesh` lays it.

`compiled.memory_analysis()` gives each program's per-chip argument, output, temporary and aliased bytes and
its peak. A program alone can miss what stays on the chip while it runs (the optimizer state during the
forward passes, the gradient sum between micro-batches), so the plan adds those: a phase's peak is the resident
buffers that are not the program's arguments plus the program's peak. A program that cannot fit at all fails to
compile with RESOURCE_EXHAUSTED; the plan keeps the compiler's numbers and marks it as not fitting.

FLOPs are counted analytically: XLA's `cost_analysis()` counts a scanned layer loop's body once.

The modules: `inputs` (the model, the mesh and the worst-case shapes of a config, analytic FLOPs), `programs` (the
chip's HBM, compiling the programs, the `Plan`) and `report` (the plan as text). `scripts/plan_memory.py` runs them.
"""
