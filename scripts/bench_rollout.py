"""Rollout throughput: our group sampler against transformers' `generate` (or, for long-tailed response lengths,
its continuous batching), side by side on the same machine.

    .venv/bin/python scripts/bench_rollout.py [--configs tiny,60m] [--batches 1,16,64] [--modes greedy,sample]
        [--prompt_length 64] [--new_tokens 128] [--repeats 3] [--output results.json]
    .venv/bin/python scripts/bench_rollout.py --scenario long_tail [--batches 64] [--num_slots 64] [--page_size 16] ...

Both run the same random-weight Qwen2 configuration (the weights are made by transformers, saved, and loaded into
our model), in float32 on the CPU, on the same random prompts, every response forced to `new_tokens` tokens (no
eos). For each batch size (prompts decoded together; one response each) and mode (greedy, or sampling at
temperature 1 with top_p 1 and no top-k) the two are timed alternately, after a warm-up that compiles ours, and
the best of `repeats` runs is kept. Throughput is new tokens per second over the whole call (prefill included).

It prints one JSON document: per setting, both figures and `ratio` (ours / transformers), and the machine's
limit: the tokens/s of a run that does nothing but the unavoidable work at the machine's speed. Each decode step
streams all weights once and costs about 2 flops per weight per slot, so a step takes at least
max(weight bytes / bandwidth, batch * flops per token / peak); the prefill adds its own flops (2 per layer
weight per prompt token, the LM head on each prompt's last token only). Bandwidth and peak are measured here (a
streaming reduction over a large array and a large matrix product in XLA) unless given. `fraction_of_limit` is our
figure over that limit, and `ratio_ceiling` the ratio to transformers that a run at the limit would reach: where
it is below 2, being twice as fast as transformers in that setting would take matrix products faster than the
measured peak. `matmuls_only_tokens_per_s` is measured rather than computed: a program doing nothing but the
run's matrix products in XLA (`matmuls_only_seconds`), and `matmuls_only_ratio` the ratio to transformers such a
run reaches. Where a setting is bound by the matmul peak (batch 64), that is about what XLA's own matrix products
allow on this machine if attention, norms and the choice of tokens were free; where it is bound by streaming the
weights (batch 1), ours can match it, as its products stream the same weights.

With `--scenario long_tail` it measures instead what DAPO's rollouts look like: response lengths are long-tailed
(most responses short, a few running to the length limit), and a slotted KV cache reserves every slot's memory at
full length however short its response is, where a paged one reserves pages as a response grows, per live token.
`--batches` prompts (default 64), one response each, each request i with its own maximum response length L_i
(vLLM's `max_tokens`): lognormal draws with a fixed seed, median `new_tokens / 4` and sigma 1, rounded and
clipped to [1, new_tokens]; no eos, so every response runs exactly its L_i tokens. `--num_slots` (default: one per
prompt) sets our decode slots and transformers' requests per forward pass; `--page_size` and `--num_pages` the
KV page pool of both (default: enough for every slot at full length, so neither ever waits for a page). Ours runs
the sampler with `max_tokens`; transformers runs its continuous batching (the paged-cache manager that
`generate_batch` wraps, one `add_request` per prompt with its own `max_new_tokens`: `generate_batch` itself takes
one `max_new_tokens` for every input; `transformers_note` in the JSON says so). Throughput is the sum of the L_i
over the call's wall time (prefill and setup included; transformers' thread stop and teardown after the last
result left out), the best of `repeats` after a warm-up run;
`*_kv_reserved_per_live_token` is the KV cache reserved per cache entry in use, summed over the run's decode calls
(ours) or forward passes (transformers): 1.0 is perfect; the page rounding of short responses keeps it above.
Each result also gives the lengths' min, median, mean, max and total. The machine's limit and the matmuls-only
program assume uniform lengths and are not run in this scenario.

The machine may be shared: the load average before and after is recorded; compare figures from one run only.
"""
import json
import logging
import math
import os
import pathlib
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from dapo_jax.model import hf_io
from dapo_jax.rollout import sampler as sampler_lib
from dapo_jax.rollout.sampling import GREEDY, SamplingParams
# pylint: enable=wrong-import-position
from bench_models import CONFIGS, random_hf_model  # pylint: disable=wrong-import-position

MODES = {"greedy": GREEDY, "sample": SamplingParams(temperature=1.0, top_p=1.0, top_k=0)}

SCENARIOS = ("uniform", "long_tail")
# The long-tailed maximum response lengths: lognormal with this seed and sigma, median new_tokens / 4.
LONG_TAIL_SEED = 15
LONG_TAIL_SIGMA = 1.0

_SCENARIO = flags.DEFINE_enum("scenario", "uniform", SCENARIOS,
                              "uniform: every response new_tokens long, against transformers' generate; long_tail: "
                              "one long-tailed maximum length per request, against transformers' continuous batching.")
_CONFIGS = flags.DEFINE_list("configs", ["tiny", "60m"], f"Model shapes to run, of {sorted(CONFIGS)}.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"],
                             "Batch sizes (prompts decoded together); long_tail: prompts per run, 64 unless given.")
_MODES = flags.DEFINE_list("modes", ["greedy", "sample"], f"Of {sorted(MODES)}.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 64, "Prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "New tokens per response (forced: no eos).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per setting and framework; the best is kept.")
_STEPS_PER_CALL = flags.DEFINE_integer("steps_per_call", 16, "Our decode steps per device call.")
_BANDWIDTH = flags.DEFINE_float("bandwidth_gbs", 0.0, "Memory bandwidth in GB/s; 0 measures it.")
_PEAK = flags.DEFINE_float("peak_gflops", 0.0, "float32 matmul peak in GFLOP/s; 0 measures it.")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 0, "long_tail: our decode slots and transformers' requests per "
                                   "forward pass (vLLM's max_num_seqs); 0: one per prompt.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "long_tail: tokens per KV page, ours and transformers'.")
_NUM_PAGES = flags.DEFINE_integer("num_pages", 0, "long_tail: KV pages in the pool, ours and transformers'; 0: "
                                  "enough for every slot at full length (prompt_length + new_tokens).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the JSON here.")


def measure_machine() -> dict:
  """Streaming bandwidth (a reduction over 512 MB) and float32 matmul peak (2048^3), best of 20, in XLA.

  Best of 20 rather than of a few: on a shared virtual machine a second or so with one core taken away halved
  the peak of a best of 5 (docs/benchmarks.md)."""
  big = jnp.ones((128 * 2**20,), jnp.float32)
  reduce = jax.jit(jnp.sum)
  left = jnp.ones((2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)

  bandwidth = big.nbytes / best_seconds(reduce, (big,), repeats=20) / 1e9
  peak = 2 * 2048**3 / best_seconds(matmul, (left,), repeats=20) / 1e9
  return {"bandwidth_gbs": round(bandwidth, 1), "peak_gflops": round(peak, 1)}


def best_seconds(fn, args: tuple, repeats: int) -> float:
  """The best of `repeats` timed calls `fn(*args)`, after one untimed call (which compiles a jitted `fn`)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def seconds_at_the_limit(hf_config: dict, batch: int, prompt_length: int, new_tokens: int, bandwidth_gbs: float,
                         peak_gflops: float) -> float:
  """The least time a run of `batch` prompts of `prompt_length` tokens and `new_tokens` decode steps can take:
  the prefill's flops, then per step the larger of streaming the weights and the step's flops."""
  e, i, v, layers = (hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["vocab_size"],
                     hf_config["num_hidden_layers"])
  heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
  d = e // heads
  layer_weights = layers * (e * heads * d * 2 + e * kv_heads * d * 2 + 3 * e * i)  # q, o, k, v, gate, up, down
  head_weights = v * e  # the LM head is read every decode step, tied or not

  def attention_flops(context: float) -> float:  # scores and weighted values, per token
    return 4.0 * layers * heads * d * context

  prefill_flops = batch * (prompt_length * (2.0 * layer_weights + attention_flops(prompt_length / 2))
                           + 2.0 * head_weights)
  step_flops = batch * (2.0 * (layer_weights + head_weights) + attention_flops(prompt_length + new_tokens / 2))
  step_seconds = max(4.0 * (layer_weights + head_weights) / (bandwidth_gbs * 1e9), step_flops / (peak_gflops * 1e9))
  return prefill_flops / (peak_gflops * 1e9) + new_tokens * step_seconds


def matmuls_only_seconds(hf_config: dict, batch: int, prompt_length: int, new_tokens: int, repeats: int) -> float:
  """The best of `repeats` runs, after a compile, of a program that does only a rollout's matrix products, in XLA
  here: the prefill's (every prompt token through the layers' projections, the LM head on each prompt's last
  token) and `new_tokens` decode steps' (`batch` rows through the layers and the LM head), on random weights of
  the model's shapes laid out as our decode steps lay them (q, k and v fused; gate and up fused; the LM head as
  [vocab, embed] @ [embed, rows], as greedy steps apply it). Attention, norms, RoPE and the choice of tokens are
  left out (a maximum over each step's logits stands for the choice, so that no product is optimised away): what a
  run whose every other part cost nothing would take, bound by XLA's matrix products on this machine."""
  e, i, v, layers = (hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["vocab_size"],
                     hf_config["num_hidden_layers"])
  heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
  d = e // heads
  q_width = heads * d
  rng = np.random.default_rng(0)

  def weight(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)

  weights = {"layers": [{"qkv": weight(e, q_width + 2 * kv_heads * d), "o": weight(q_width, e),
                         "gate_up": weight(e, 2 * i), "down": weight(i, e)} for _ in range(layers)],
             "unembed": weight(v, e)}

  def through_layers(layer_weights, h):
    for layer in layer_weights:
      qkv = h @ layer["qkv"]
      # The sum of k and v keeps XLA from slicing their columns out of the product.
      h = h + qkv[:, :q_width] @ layer["o"] + 1e-6 * jnp.sum(qkv[:, q_width:], axis=1, keepdims=True)
      gate_up = h @ layer["gate_up"]
      h = h + (gate_up[:, :i] * gate_up[:, i:]) @ layer["down"]
    return h

  def with_logits(unembed, h):
    return h + 1e-6 * jnp.max(unembed @ h.T, axis=0)[:, None]

  @jax.jit
  def run(weights, prompt_hidden):  # [batch * prompt_length, embed]
    last = through_layers(weights["layers"], prompt_hidden)[prompt_length - 1::prompt_length]
    step = lambda h, _: (with_logits(weights["unembed"], through_layers(weights["layers"], h)), None)
    return jax.lax.scan(step, with_logits(weights["unembed"], last), None, length=new_tokens)[0]

  return best_seconds(run, (weights, weight(batch * prompt_length, e)), repeats)


def make_models(name: str, directory: str):
  hf_model = random_hf_model(name).eval()
  hf_model.generation_config.eos_token_id = None
  hf_model.generation_config.pad_token_id = 0
  hf_model.save_pretrained(directory)
  config, model = hf_io.load_hf_checkpoint(directory, dtype=jnp.float32)
  return hf_model, config, model.params


def run_transformers(hf_model, prompts: np.ndarray, mode: str, new_tokens: int) -> float:
  ids = torch.tensor(prompts, dtype=torch.long)
  kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=mode == "sample")
  if mode == "sample":
    kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
  start = time.perf_counter()
  with torch.no_grad():
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
  seconds = time.perf_counter() - start
  assert out.shape == (prompts.shape[0], prompts.shape[1] + new_tokens), out.shape
  return seconds


def run_ours(sampler: sampler_lib.GroupSampler, params, prompts: np.ndarray, mode: str, seed: int) -> float:
  start = time.perf_counter()
  groups = sampler.sample(params, prompts.tolist(), n=1, seed=seed, sampling=MODES[mode])
  seconds = time.perf_counter() - start
  assert all(len(g.responses[0].token_ids) == sampler.max_response_length for g in groups)
  return seconds


# ---------------------------------------------------------------------------------------------------------------
# The long-tailed scenario

TRANSFORMERS_NOTE = (
    "generate_batch(inputs, generation_config, continuous_batching_config, max_new_tokens=...) takes one "
    "max_new_tokens for every input; the ContinuousBatchingManager it wraps takes one per request "
    "(add_request(input_ids, request_id, max_new_tokens)). This run drives that manager as generate_batch does "
    "(continuous_batching_context_manager, one add_request per prompt with its own max_new_tokens, get_result until "
    "all have finished), eos_token_id -1 (no early stop), sdpa attention over its paged cache (page_size, num_blocks "
    "as ours; max_batch_tokens min(8192, slots * prompt_length); max_requests_per_batch = slots). Timed from the "
    "manager's setup to the last result: the thread stop and teardown generate_batch adds after it are left out "
    "(fixed waits, no work). Its KV figure "
    "is counted by a hook on the batch processor's prepare_next_batch (transformers internals): per forward pass, "
    "the blocks in the active requests' block tables times page_size, over their cache lengths.")


def long_tail_lengths(count: int, new_tokens: int) -> np.ndarray:
  """Each request's maximum response length: lognormal draws (fixed seed) of median new_tokens / 4 and sigma
  LONG_TAIL_SIGMA, rounded and clipped to [1, new_tokens]. One stream of draws: a smaller batch's lengths are the
  first of a larger one's."""
  draws = np.random.default_rng(LONG_TAIL_SEED).lognormal(np.log(new_tokens / 4), LONG_TAIL_SIGMA, count)
  return np.clip(np.rint(draws), 1, new_tokens).astype(np.int64)


def length_summary(lengths: np.ndarray) -> dict:
  return {"min": int(lengths.min()), "median": float(np.median(lengths)), "mean": round(float(lengths.mean()), 2),
          "max": int(lengths.max()), "total": int(lengths.sum())}


def run_ours_long_tail(sampler: sampler_lib.GroupSampler, params, prompts: np.ndarray, lengths: np.ndarray,
                       mode: str, seed: int) -> tuple[float, float | None]:
  """One run with each prompt's max_tokens; returns its seconds and the KV cache entries reserved per live entry
  over its decode calls."""
  start = time.perf_counter()
  groups = sampler.sample(params, prompts.tolist(), n=1, seed=seed, sampling=MODES[mode],
                          max_tokens=[int(length) for length in lengths])
  seconds = time.perf_counter() - start
  assert [len(g.responses[0].token_ids) for g in groups] == lengths.tolist()
  stats = sampler.last_run_stats
  if not stats.live_kv_entries:
    return seconds, None
  return seconds, stats.reserved_kv_entries / stats.live_kv_entries


def _count_transformers_kv(processor, counts: dict) -> None:
  """Wraps `processor.prepare_next_batch` (a ContinuousBatchProcessor of transformers 5.24; internals) so that
  every forward pass adds to `counts` the cache entries its active requests' blocks hold ("reserved") and those
  they fill once the pass has run ("live"): blocks are allocated, and position offsets advanced, when the batch is
  prepared."""
  prepare = processor.prepare_next_batch
  cache, scheduler = processor.cache, processor.scheduler

  def prepare_and_count():
    scheduled = prepare()
    if scheduled:
      active = list(scheduler.active_requests.values())
      for allocator in cache.cache_allocators.values():
        blocks = {block for state in active for block in allocator.block_table.get(state.request_id, ())}
        counts["reserved"] += len(blocks) * allocator.tokens_per_page
      counts["live"] += sum(state.current_len() for state in active)
    return scheduled

  processor.prepare_next_batch = prepare_and_count


def run_transformers_long_tail(hf_model, prompts: np.ndarray, lengths: np.ndarray, mode: str, *, slots: int,
                               page_size: int, num_pages: int, seed: int) -> tuple[float, float | None]:
  """One run of transformers' continuous batching, each prompt with its own max_new_tokens (TRANSFORMERS_NOTE);
  returns its seconds and its KV cache entries reserved per live entry. The seconds run from the manager's setup
  (its cache allocated, its thread started) to the last result; what `generate_batch` adds after it, stopping the
  manager's thread and freeing it, is left out: fixed waits (tenths of a second on CPU), no work."""
  sample_kwargs = dict(temperature=1.0, top_p=1.0, top_k=0) if mode == "sample" else {}
  generation_config = transformers.GenerationConfig(
      do_sample=mode == "sample", max_new_tokens=int(lengths.max()), eos_token_id=-1, pad_token_id=0,
      **sample_kwargs)
  cb_config = transformers.ContinuousBatchingConfig(
      page_size=page_size, num_blocks=num_pages, max_requests_per_batch=slots,
      max_batch_tokens=min(8192, slots * prompts.shape[1]), seed=seed)
  counts = {"reserved": 0, "live": 0}
  results = {}
  start = time.perf_counter()
  with hf_model.continuous_batching_context_manager(generation_config=generation_config,
                                                    continuous_batching_config=cb_config, block=True,
                                                    timeout=5) as manager:
    _count_transformers_kv(manager.batch_processor, counts)  # made by the manager's warm-up, before any request
    for i, (prompt, length) in enumerate(zip(prompts.tolist(), lengths.tolist())):
      manager.add_request(prompt, request_id=f"req_{i}", max_new_tokens=length)
    while len(results) < len(prompts):
      result = manager.get_result(timeout=1)
      if result is not None and result.is_finished():
        results[result.request_id] = result
      elif result is None and not manager.is_running():
        raise RuntimeError("transformers' continuous batching stopped before every request finished")
    seconds = time.perf_counter() - start  # the manager's stop and teardown (fixed waits, no work) left out
  errors = [r.error for r in results.values() if r.error is not None]
  assert not errors, errors
  got = [len(results[f"req_{i}"].generated_tokens) for i in range(len(prompts))]
  assert got == lengths.tolist(), got
  return seconds, counts["reserved"] / counts["live"] if counts["live"] else None


def long_tail_results(name: str, hf_model, config, params, batch: int) -> list[dict]:
  """Per mode: ours and transformers' continuous batching on `batch` prompts of long-tailed maximum lengths."""
  new_tokens, prompt_length = _NEW_TOKENS.value, _PROMPT_LENGTH.value
  prompts = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, prompt_length))
  lengths = long_tail_lengths(batch, new_tokens)
  slots = _NUM_SLOTS.value or batch
  page_size = _PAGE_SIZE.value
  num_pages = _NUM_PAGES.value or slots * math.ceil((prompt_length + new_tokens) / page_size)
  sampler = sampler_lib.GroupSampler(config, num_slots=slots, max_prompt_length=prompt_length,
                                     max_response_length=new_tokens,
                                     steps_per_call=min(_STEPS_PER_CALL.value, new_tokens), page_size=page_size,
                                     num_pages=num_pages)
  tokens = int(lengths.sum())  # what the requests ask for: each response's first L_i tokens
  theirs_kwargs = dict(slots=slots, page_size=page_size, num_pages=num_pages)
  results = []
  for mode in _MODES.value:
    run_ours_long_tail(sampler, params, prompts, lengths, mode, seed=0)  # compiles
    transformers_error = None
    try:
      run_transformers_long_tail(hf_model, prompts[:2, :8], lengths[:2].clip(max=4), mode, seed=0,
                                 **theirs_kwargs)  # warms up
    except Exception as error:  # pylint: disable=broad-except  (recorded in the JSON; ours still runs)
      transformers_error = f"{type(error).__name__}: {error}"
    ours, theirs = [], []
    for repeat in range(_REPEATS.value):
      ours.append(run_ours_long_tail(sampler, params, prompts, lengths, mode, seed=repeat))
      if transformers_error is None:
        theirs.append(run_transformers_long_tail(hf_model, prompts, lengths, mode, seed=repeat, **theirs_kwargs))
    ours_rate = tokens / min(seconds for seconds, _ in ours)
    theirs_rate = tokens / min(seconds for seconds, _ in theirs) if theirs else None
    result = {"scenario": "long_tail", "config": name, "batch": batch, "num_slots": slots, "mode": mode,
              "lengths": length_summary(lengths), "ours_tokens_per_s": round(ours_rate, 1),
              "ours_kv_reserved_per_live_token": _rounded(ours[-1][1]),
              "transformers_tokens_per_s": _rounded(theirs_rate, 1),
              "transformers_kv_reserved_per_live_token": _rounded(theirs[-1][1]) if theirs else None,
              "ratio": round(ours_rate / theirs_rate, 2) if theirs_rate else None}
    if transformers_error is not None:
      result["transformers_error"] = transformers_error
    print(json.dumps(result), flush=True)
    results.append(result)
  return results


def _rounded(value: float | None, digits: int = 3) -> float | None:
  return None if value is None else round(value, digits)


def main(argv):
  del argv
  unknown = set(_CONFIGS.value) - set(CONFIGS) | set(_MODES.value) - set(MODES)
  if unknown:
    raise app.UsageError(f"unknown configs or modes: {sorted(unknown)}")
  if _SCENARIO.value == "long_tail":
    long_tail_main()
    return
  load_before = os.getloadavg()
  machine = measure_machine()
  bandwidth = _BANDWIDTH.value or machine["bandwidth_gbs"]
  peak = _PEAK.value or machine["peak_gflops"]
  new_tokens, prompt_length = _NEW_TOKENS.value, _PROMPT_LENGTH.value
  results = []
  for name in _CONFIGS.value:
    with tempfile.TemporaryDirectory() as directory:
      hf_model, config, params = make_models(name, directory)
    for batch in (int(b) for b in _BATCHES.value):
      prompts = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, prompt_length))
      sampler = sampler_lib.GroupSampler(config, num_slots=batch, max_prompt_length=prompt_length,
                                         max_response_length=new_tokens,
                                         steps_per_call=min(_STEPS_PER_CALL.value, new_tokens))
      limit = batch * new_tokens / seconds_at_the_limit(CONFIGS[name], batch, prompt_length, new_tokens, bandwidth,
                                                        peak)
      matmuls_only = batch * new_tokens / matmuls_only_seconds(CONFIGS[name], batch, prompt_length, new_tokens,
                                                               _REPEATS.value)
      for mode in _MODES.value:
        run_ours(sampler, params, prompts, mode, seed=0)  # compiles
        run_transformers(hf_model, prompts[:, :8], mode, 4)  # warms up
        ours, theirs = [], []
        for repeat in range(_REPEATS.value):
          ours.append(run_ours(sampler, params, prompts, mode, seed=repeat))
          theirs.append(run_transformers(hf_model, prompts, mode, new_tokens))
        ours_rate = batch * new_tokens / min(ours)
        theirs_rate = batch * new_tokens / min(theirs)
        result = {"config": name, "batch": batch, "mode": mode, "ours_tokens_per_s": round(ours_rate, 1),
                  "transformers_tokens_per_s": round(theirs_rate, 1), "ratio": round(ours_rate / theirs_rate, 2),
                  "machine_limit_tokens_per_s": round(limit, 1), "fraction_of_limit": round(ours_rate / limit, 3),
                  "ratio_ceiling": round(limit / theirs_rate, 2),
                  "matmuls_only_tokens_per_s": round(matmuls_only, 1),
                  "matmuls_only_ratio": round(matmuls_only / theirs_rate, 2)}
        print(json.dumps(result), flush=True)
        results.append(result)
  report = {
      "scenario": "uniform", "prompt_length": prompt_length, "new_tokens": new_tokens, "repeats": _REPEATS.value,
      "steps_per_call": _STEPS_PER_CALL.value, "dtype": "float32", "torch_threads": torch.get_num_threads(),
      "cpu_count": os.cpu_count(), "bandwidth_gbs": bandwidth, "peak_gflops": peak, "measured": machine,
      "load_average_before": [round(x, 2) for x in load_before],
      "load_average_after": [round(x, 2) for x in os.getloadavg()], "results": results,
  }
  write_report(report)


def long_tail_main():
  logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)  # its INFO lines, every run
  load_before = os.getloadavg()
  batches = _BATCHES.value if flags.FLAGS["batches"].present else ["64"]
  results = []
  for name in _CONFIGS.value:
    with tempfile.TemporaryDirectory() as directory:
      hf_model, config, params = make_models(name, directory)
    for batch in (int(b) for b in batches):
      results.extend(long_tail_results(name, hf_model, config, params, batch))
  report = {
      "scenario": "long_tail", "prompt_length": _PROMPT_LENGTH.value, "new_tokens": _NEW_TOKENS.value,
      "length_distribution": {"kind": "lognormal", "median": _NEW_TOKENS.value / 4, "sigma": LONG_TAIL_SIGMA,
                              "seed": LONG_TAIL_SEED, "clipped_to": [1, _NEW_TOKENS.value]},
      "page_size": _PAGE_SIZE.value, "num_pages": _NUM_PAGES.value or "every slot at full length",
      "repeats": _REPEATS.value, "steps_per_call": _STEPS_PER_CALL.value, "dtype": "float32",
      "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
      "transformers_version": transformers.__version__, "transformers_note": TRANSFORMERS_NOTE,
      "load_average_before": [round(x, 2) for x in load_before],
      "load_average_after": [round(x, 2) for x in os.getloadavg()], "results": results,
  }
  write_report(report)


def write_report(report: dict) -> None:
  text = json.dumps(report, indent=1)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
