"""A JetStream `Engine` (google-jetstream 0.2.2's `engine_api`) for the Qwen2 model.

The engine exposes the device functions of `decoding.py` (the ones the group sampler drives) through JetStream's
API, so JetStream's own orchestrator and gRPC server (`dapo_jax.serve`) can run the model:

    engine = QwenEngine(config, params=params, tokenizer=tokenizer, num_slots=8, max_prefill_length=1024,
                        max_response_length=1024, sampling=SamplingParams(temperature=0.0))
    params = engine.load_params()                                                 # EngineParams
    prefix = engine.prefill(params=params, padded_tokens=tokens, true_length=n)   # KV cache + first logits
    state = engine.insert(prefix, engine.init_decode_state(), slot=0)           # samples the first token
    state, result = engine.generate(params, state)                              # ResultTokens, all slots

The layout of `generate`'s ResultTokens follows JetStream's mock engine: one int32 array [slots, 2k + 1] of the
k tokens of each slot, their validity, and the slot's response length (counting the first token of the call).
A slot's first `generate` after `insert` returns the response's first token, because the decode state keeps each
response's next token until it is returned (see `decoding.py`): JetStream 0.2.2's orchestrator streams only what
`generate` returns, so a first token returned by prefill would be lost.

Group helpers, in the spirit of newer JetStream: `prefill_multisampling` prefills a prompt once for `n` samples
and `bulk_insert` puts it into `n` slots in one device call.

Randomness: each prefill gets the next prompt number; response j of it draws token t with a key made from
(seed, prompt number, j, t), as in the group sampler.

BOS: Qwen has none. JetStream's orchestrator prepends `tokenizer.bos_id` to token-id requests unconditionally,
so for a tokenizer without BOS the adapter reports `NO_BOS_ID` (-1), which `prefill` drops again.

Importing this module loads JetStream (and with it seqio and TensorFlow); the training program uses the group
sampler, which does not.
"""
from collections.abc import Iterable, Sequence
import itertools
import os
from typing import Any, NamedTuple

from dapo_jax import jetstream_compat  # pylint: disable=unused-import  (before jetstream)

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
from jetstream.engine import engine_api
from jetstream.engine import token_utils
from jetstream.engine import tokenizer_api
from jetstream.engine import tokenizer_pb2

from dapo_jax import sharding as sharding_lib
from dapo_jax.model import attention as attention_lib
from dapo_jax.model import hf_io
from dapo_jax.model import qwen2
from dapo_jax.model.config import Qwen2Config
from dapo_jax.model.tokenizer import Tokenizer
from dapo_jax.rl import batching
from dapo_jax.rollout import decode_state as decode_state_lib
from dapo_jax.rollout import decoding
from dapo_jax.rollout import page_table
from dapo_jax.rollout import weight_layout
from dapo_jax.rollout.decode_state import DecodeState
from dapo_jax.rollout import sampling as sampling_lib
from dapo_jax.rollout.sampling import SamplingParams

# The BOS id reported to JetStream when the tokenizer has none; `QwenEngine.prefill` drops it.
NO_BOS_ID = -1


class EngineParams(NamedTuple):
  """What `load_params` returns and prefill / generate take: the model's weights laid out for prefill and decode
  steps (`weight_layout.decode_weights`)."""
  decode: weight_layout.DecodeWeights


class EnginePrefix(NamedTuple):
  """A prefill result: the prompt's KV cache and next-token logits, and the prompt's number (for its keys)."""
  prefix: decode_state_lib.Prefix
  prompt_number: jax.Array  # int32 scalar


class JetStreamTokenizer(tokenizer_api.Tokenizer):
  """Our tokenizer behind JetStream's TokenizerAPI, without seqio's sentencepiece default and without BOS.

  `encode` pads to JetStream's prefill buckets as its own tokenizers do; stop tokens are every eos id (and the
  pad id, JetStream's default).
  """

  def __init__(self, tokenizer: Tokenizer | None, eos_ids: Iterable[int], pad_id: int | None):
    self._tokenizer = tokenizer
    self._eos_ids = tuple(eos_ids)
    self._pad_id = pad_id if pad_id is not None else (self._eos_ids[0] if self._eos_ids else 0)

  def _require_tokenizer(self) -> Tokenizer:
    if self._tokenizer is None:
      raise ValueError("this engine was built without a tokenizer: send token ids (token_content), or build the "
                       "engine with tokenizer=load_tokenizer(checkpoint_dir)")
    return self._tokenizer

  def encode(self, s: str, **kwargs) -> tuple[jax.Array | np.ndarray, int]:
    """Token ids of `s`, padded to a JetStream prefill bucket: (padded ids, true length).

    Keyword arguments as JetStream's tokenizers take them: `is_bos` (prepend BOS, when the tokenizer has one),
    `prefill_lengths`, `max_prefill_length`, `jax_padding`.
    """
    tokenizer = self._require_tokenizer()
    ids = tokenizer.encode(s, add_special_tokens=False)
    if kwargs.get("is_bos", True) and tokenizer.bos_id is not None:
      ids = [tokenizer.bos_id] + ids
    return token_utils.pad_tokens(
        np.asarray(ids, np.int32), self.bos_id, self.pad_id, is_bos=False,
        prefill_lengths=kwargs.get("prefill_lengths"), max_prefill_length=kwargs.get("max_prefill_length"),
        jax_padding=kwargs.get("jax_padding", True))

  def decode(self, token_ids: list[int], **kwargs) -> str:
    del kwargs  # JetStream passes is_streaming to sentencepiece tokenizers only
    return self._require_tokenizer().decode(token_ids)

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def eos_id(self) -> int:
    return self._eos_ids[0] if self._eos_ids else self._pad_id

  @property
  def bos_id(self) -> int:
    if self._tokenizer is not None and self._tokenizer.bos_id is not None:
      return self._tokenizer.bos_id
    return NO_BOS_ID

  @property
  def stop_tokens(self) -> set[int]:
    return set(self._eos_ids) | {self._pad_id}


class QwenEngine(engine_api.Engine):
  """JetStream's Engine API over the Qwen2 model (one sample per slot; groups through the bulk helpers)."""

  def __init__(self, config: Qwen2Config, *, num_slots: int, max_prefill_length: int, max_response_length: int,
               params: qwen2.Params | None = None, checkpoint: str | os.PathLike | None = None,
               tokenizer: Tokenizer | None = None, eos_ids: Iterable[int] | None = None,
               sampling: SamplingParams = sampling_lib.GREEDY, steps_per_generate: int = 1, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, rules=sharding_lib.DEFAULT_RULES, page_size: int = 16):
    """Configures the engine.

    Args:
      config: the model's shape.
      num_slots: decode slots (JetStream's max_concurrent_decodes).
      max_prefill_length: the longest prompt; a power of two >= 16 (one of JetStream's prefill buckets).
      max_response_length: tokens a slot can generate after its prompt (sizes the KV cache).
      params: the model weights (the plain dict) `load_params` lays out; or give `checkpoint`, a Hugging Face
        directory to load them from (into `mesh` when given).
      tokenizer: for text requests and stop tokens; `eos_ids` defaults to its eos ids.
      eos_ids: stop ids reported to JetStream (the engine itself decodes until the orchestrator stops a slot).
      sampling: how tokens are chosen (default greedy).
      steps_per_generate: decode steps fused into each `generate` call (JetStream's speculations axis). With
        more than one, the orchestrator may return up to steps_per_generate - 1 tokens beyond a request's
        max_tokens (it checks lengths per call).
      seed: with the prompt number and sample index, decides every random draw.
      mesh: where params and the decode state live (default: the first device).
      rules: logical-axis rules for the decode state's sharding.
      page_size: cache entries per page of the KV pool. JetStream's orchestrator cannot requeue a preempted
        request, so each slot owns the pages of a full-length response for good (`page_table.full_length_table`).
    """
    if params is None and checkpoint is None:
      raise ValueError("QwenEngine needs params or a checkpoint directory to load them from")
    if max_prefill_length < 16 or max_prefill_length & (max_prefill_length - 1):
      raise ValueError(f"QwenEngine: max_prefill_length must be a power of two >= 16 (JetStream pads prompts to "
                       f"such buckets), got {max_prefill_length}")
    self.config = config
    self._num_slots = num_slots
    self._max_prefill_length = max_prefill_length
    self.max_response_length = max_response_length
    self._params = params
    self._checkpoint = checkpoint
    self._tokenizer = tokenizer
    self.eos_ids = tuple(eos_ids) if eos_ids is not None else (tokenizer.eos_ids if tokenizer is not None else ())
    self.sampling = sampling
    self.steps_per_generate = steps_per_generate
    self.seed = seed
    self._mesh = mesh or sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    self.cache_length = max_prefill_length + max_response_length
    if page_size < 1 or page_size & (page_size - 1) or page_size > max_prefill_length:
      raise ValueError(f"QwenEngine: page_size must be a power of two no longer than max_prefill_length, got "
                       f"{page_size}")
    self.page_size = page_size
    platform = self._mesh.devices.flat[0].platform
    self._keys_transposed = decode_state_lib.keys_transposed_on(platform)
    self._page_shards = decode_state_lib.state_layout(config, self._mesh, num_slots, rules).page_shards
    pages_per_slot = -(-self.cache_length // page_size)
    # Each slot owns its pages; on a mesh, page numbers count within the slot's shard of the pool.
    self._page_table = page_table.full_length_table(num_slots, pages_per_slot)
    self._decode_page_table = self._page_table % (num_slots // self._page_shards * pages_per_slot)
    self._state_shardings = decode_state_lib.decode_state_shardings(config, self._mesh, num_slots, rules)
    self._functions = decoding.jitted_functions(
        config, self._state_shardings, self._keys_transposed,
        decoding.attention_kernel_on(platform, self._mesh.size, config, page_size),
        attention_lib.MeshLayout(self._mesh, tuple(rules)))
    self._response_keys = jax.jit(jax.vmap(sampling_lib.response_key, in_axes=(None, None, 0)))
    self._result_data = jax.jit(_result_data, static_argnames=("num_steps",))
    self._prompt_numbers = itertools.count()

  # -----------------------------------------------------------------------------------------------------------
  # Parameters and state

  def load_params(self, *args, **kwargs) -> EngineParams:
    """The weights given to the constructor, or loaded from its checkpoint into the engine's mesh, as
    `EngineParams` (what prefill and generate take)."""
    del args, kwargs
    if self._params is None:
      _, model = hf_io.load_hf_checkpoint(self._checkpoint, dtype=self.config.dtype,
                                          param_dtype=self.config.param_dtype, mesh=self._mesh)
      self._params = model.params
    return self.engine_params(self._params)

  def engine_params(self, params: qwen2.Params) -> EngineParams:
    """`EngineParams` of model weights (e.g. freshly trained ones): their decode layout on the engine's mesh."""
    return EngineParams(decode=self._functions.decode_weights(params, greedy=self.sampling.greedy))

  def init_decode_state(self, *args, **kwargs) -> DecodeState:
    del args, kwargs
    return decode_state_lib.init_decode_state(self.config, self._num_slots, self._page_table.size, self.page_size,
                                              shardings=self._state_shardings, keys_transposed=self._keys_transposed)

  # -----------------------------------------------------------------------------------------------------------
  # Prefill, insert, generate

  def prefill(self, *, params: EngineParams, existing_prefix: EnginePrefix | None = None,
              padded_tokens: jax.Array | np.ndarray, true_length: int) -> EnginePrefix:
    """The prompt's KV cache and next-token logits; the prompt is re-padded to its power-of-two bucket."""
    if existing_prefix is not None:
      raise NotImplementedError("QwenEngine.prefill does not continue an existing prefix (JetStream sessions)")
    tokens = np.asarray(padded_tokens, np.int32).reshape(-1)[:max(int(true_length), 0)]
    if tokens.size and tokens[0] == NO_BOS_ID:  # JetStream's placeholder for a BOS this tokenizer lacks
      tokens = tokens[1:]
    if not 1 <= tokens.size <= self._max_prefill_length:
      raise ValueError(f"QwenEngine.prefill: the prompt has {tokens.size} tokens; 1 to {self._max_prefill_length} "
                       "are accepted")
    bucket = batching.bucket_length(tokens.size, max(decoding.MIN_PREFILL_BUCKET, self.page_size))
    padded = np.zeros((1, bucket), np.int32)
    padded[0, :tokens.size] = tokens
    prefix = self._functions.prefill(params.decode, padded, np.array([tokens.size], np.int32))
    return EnginePrefix(prefix=prefix, prompt_number=jnp.asarray(next(self._prompt_numbers), jnp.int32))

  def prefill_multisampling(self, *, params: EngineParams, padded_tokens: jax.Array | np.ndarray,
                            true_length: int, num_samples: int) -> EnginePrefix:
    """Prefills a prompt once for a group of `num_samples` responses (insert them with `bulk_insert`)."""
    if num_samples < 1 or num_samples > self._num_slots:
      raise ValueError(f"num_samples must be in [1, {self._num_slots}] (the engine's slots), got {num_samples}")
    return self.prefill(params=params, padded_tokens=padded_tokens, true_length=true_length)

  def bulk_insert(self, prefix: EnginePrefix, decode_state: DecodeState,
                  slots: Sequence[int]) -> DecodeState:
    """Inserts one prefix into several slots in one device call: sample j (its own key) goes to `slots[j]`."""
    slots = [int(slot) for slot in slots]
    if not slots or len(set(slots)) != len(slots) or not all(0 <= s < self._num_slots for s in slots):
      raise ValueError(f"bulk_insert: slots must be distinct, in [0, {self._num_slots}), got {slots}")
    keys = self._response_keys(np.uint32(self.seed), prefix.prompt_number, np.arange(len(slots), dtype=np.int32))
    writes, starts = page_table.prefix_into_slots(self._page_table, np.zeros(len(slots), np.int32), slots,
                                                  prefix.prefix.v.shape[3], self.page_size, keys)
    return self._functions.insert(prefix.prefix, decode_state, writes, starts, sampling=self.sampling)

  def insert(self, prefix: EnginePrefix, decode_state: DecodeState, slot: int) -> DecodeState:
    """Starts the prefix's (first) response in `slot`, sampling its first token."""
    return self.bulk_insert(prefix, decode_state, [slot])

  def generate(self, params: EngineParams,
               decode_state: DecodeState) -> tuple[DecodeState, engine_api.ResultTokens]:
    """`steps_per_generate` tokens for every slot."""
    num_steps = self.steps_per_generate
    decode_state, output = self._functions.decode_steps(params.decode, decode_state, self._decode_page_table,
                                                        num_steps=num_steps, sampling=self.sampling)
    data = self._result_data(output.tokens, decode_state.positions, num_steps=num_steps)
    return decode_state, engine_api.ResultTokens(
        data=data, tokens_idx=(0, num_steps), valid_idx=(num_steps, 2 * num_steps),
        length_idx=(2 * num_steps, 2 * num_steps + 1), samples_per_slot=1)

  # -----------------------------------------------------------------------------------------------------------
  # Tokenizer and topology

  def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
    return tokenizer_pb2.TokenizerParameters(path=self._tokenizer.source if self._tokenizer is not None else "")

  def build_tokenizer(self, metadata: tokenizer_pb2.TokenizerParameters) -> JetStreamTokenizer:
    """Our tokenizer (not JetStream's seqio sentencepiece default), whatever the metadata names."""
    del metadata
    pad_id = self._tokenizer.pad_id if self._tokenizer is not None else None
    return JetStreamTokenizer(self._tokenizer, self.eos_ids, pad_id)

  def get_prefix_destination_sharding(self) -> Any:
    """Prefixes are replicated over the engine's mesh (they are one prompt's cache)."""
    return NamedSharding(self._mesh, PartitionSpec())

  @property
  def max_concurrent_decodes(self) -> int:
    return self._num_slots

  @property
  def samples_per_slot(self) -> int:
    return 1

  @property
  def max_prefill_length(self) -> int:
    return self._max_prefill_length

  @property
  def mesh(self) -> jax.sharding.Mesh:
    return self._mesh

  @property
  def colocated_cpus(self) -> None:
    """None: the engine uses no CPU devices beside its mesh."""
    return None


def _result_data(tokens: jax.Array, positions: jax.Array, num_steps: int) -> jax.Array:
  """ResultTokens' one array: tokens [slots, k], their validity (all valid), and the response length at the
  call's first token (`positions` is the position of the next token after the call)."""
  lengths = positions - num_steps + 1
  return jnp.concatenate([tokens, jnp.ones_like(tokens), lengths[:, None]], axis=1).astype(jnp.int32)
