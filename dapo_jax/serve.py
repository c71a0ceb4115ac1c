"""Serves a checkpoint with JetStream's own orchestrator and gRPC server.

    python -m dapo_jax.serve --checkpoint DIR --port P [--num_slots 8] [--max_prefill_length 1024]
        [--max_response_length 1024] [--temperature 0 --top_p 1 --top_k 0 --seed 0] [--steps_per_generate 1]

`--checkpoint` is a Hugging Face Qwen2 directory or one of our training checkpoints (a workdir, its checkpoints/
directory, whose newest complete step is taken, or one step directory checkpoints/<step>, with the tokenizer and
generation_config.json of its policy/ directory).

Clients send JetStream `Decode` requests (`jetstream.core.proto.jetstream_pb2`): text (tokenized here with the
checkpoint's tokenizer, no chat template, no BOS) or token ids, and `max_tokens`; the response streams the
generated tokens until a stop id (generation_config.json's eos ids, else the tokenizer's, and the pad id; the
stop id itself is not streamed, as in JetStream) or `max_tokens`. One interleaved engine (`QwenEngine`) does
prefill and decode on the first device, in float32.

JetStream binds the port on all interfaces ("[::]"); connect through loopback (`localhost:P`) for local use.
"""
from dapo_jax import jetstream_compat  # pylint: disable=unused-import  (before jetstream)

import dataclasses
import logging

from absl import app
from absl import flags
import grpc
import jax
import jax.numpy as jnp
from jetstream.core import config_lib
from jetstream.core import server_lib

from dapo_jax import checkpoint as checkpoint_lib
from dapo_jax.model import checkpoint_generation
from dapo_jax.rollout.engine import QwenEngine
from dapo_jax.rollout.sampling import SamplingParams

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A Hugging Face Qwen2 directory, or a training workdir, its checkpoints/ directory or one "
    "step directory in it.", required=True)
_PORT = flags.DEFINE_integer("port", 9000, "gRPC port.")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded concurrently.")
_MAX_PREFILL_LENGTH = flags.DEFINE_integer("max_prefill_length", 1024,
                                           "Longest prompt, a power of two >= 16 (longer ones keep their end).")
_MAX_RESPONSE_LENGTH = flags.DEFINE_integer("max_response_length", 1024,
                                            "Most tokens a request may generate (sizes the KV cache).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 keeps all.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed, in [0, 2**31).")
_STEPS_PER_GENERATE = flags.DEFINE_integer(
    "steps_per_generate", 1, "Decode steps per engine call; above 1 a response may overrun max_tokens by up to "
    "steps_per_generate - 1 tokens (JetStream checks lengths once per call).")
_THREADS = flags.DEFINE_integer("threads", 16, "gRPC handler threads.")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "WARNING", ["DEBUG", "INFO", "WARNING", "ERROR"],
                               "Python logging level; JetStream logs every decode step at INFO.")


def build_engine(checkpoint: str) -> QwenEngine:
  """The engine for a checkpoint (Hugging Face or training), configured from the flags."""
  policy = checkpoint_lib.load_policy(checkpoint, dtype=jnp.float32)
  tokenizer = checkpoint_generation.load_optional_tokenizer(policy.files_dir)
  return QwenEngine(
      policy.config, params=policy.params, tokenizer=tokenizer,
      eos_ids=checkpoint_generation.stop_ids(policy.files_dir, tokenizer), num_slots=_NUM_SLOTS.value,
      max_prefill_length=_MAX_PREFILL_LENGTH.value, max_response_length=_MAX_RESPONSE_LENGTH.value,
      sampling=SamplingParams(temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value),
      steps_per_generate=_STEPS_PER_GENERATE.value, seed=_SEED.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # JetStream's orchestrator sets the root logger to DEBUG when imported.
  logging.getLogger().setLevel(_LOG_LEVEL.value)
  engine = build_engine(_CHECKPOINT.value)
  device = engine.mesh.devices.flat[0]
  # One interleaved engine (prefill and decode share it and its weights) on one "slice" of one device.
  server_config = dataclasses.replace(config_lib.ServerConfig(), interleaved_slices=(f"{device.platform}=1",),
                                      interleaved_engine_create_fns=(lambda devices: engine,))
  server = server_lib.run(port=_PORT.value, config=server_config, devices=[device],
                          credentials=grpc.insecure_server_credentials(), threads=_THREADS.value)
  print(f"Serving {_CHECKPOINT.value} on port {_PORT.value} ({jax.devices()[0].platform})", flush=True)
  server.wait_for_termination()


if __name__ == "__main__":
  app.run(main)
