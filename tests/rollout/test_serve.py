"""Tests `python -m dapo_jax.serve`: JetStream's orchestrator and gRPC server around our engine, on loopback."""
import concurrent.futures
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import grpc
import pytest

from dapo_jax.model.tokenizer import load_tokenizer
from jetstream.core.proto import jetstream_pb2
from jetstream.core.proto import jetstream_pb2_grpc
from tests.rollout.rollout_fixtures import random_prompts
from tests.rollout.test_generate import save_as_training_checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_TOKENS = 8
STARTUP_SECONDS = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
    probe.bind(("::", 0))
    return probe.getsockname()[1]


@contextlib.contextmanager
def _running_server(checkpoint_path):
  """`python -m dapo_jax.serve` on the checkpoint (2 decode slots, greedy); yields (stub, process)."""
  port = _free_port()
  process = subprocess.Popen(
      [sys.executable, "-m", "dapo_jax.serve", "--checkpoint", str(checkpoint_path), "--port", str(port),
       "--num_slots", "2", "--max_prefill_length", "32", "--max_response_length", "16"],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  channel = grpc.insecure_channel(f"localhost:{port}")
  try:
    try:
      grpc.channel_ready_future(channel).result(timeout=STARTUP_SECONDS)
    except grpc.FutureTimeoutError:
      process.kill()
      pytest.fail(f"the server did not start in {STARTUP_SECONDS} s:\n{process.communicate()[0][-3000:]}")
    yield jetstream_pb2_grpc.OrchestratorStub(channel), process
  finally:
    channel.close()
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()


@pytest.fixture(scope="module")
def served_checkpoint(qwen_like_checkpoint, tmp_path_factory):
  """A checkpoint whose generation config stops on a token that greedy decoding of the first test prompt
  reaches; a dict with its directory, a reference function and the prompts."""
  checkpoint = qwen_like_checkpoint
  directory = tmp_path_factory.mktemp("serve") / "checkpoint"
  shutil.copytree(checkpoint.directory, directory)
  tokenizer = load_tokenizer(directory)
  prompts = random_prompts(tokenizer.vocab_size, (5, 9, 14, 6, 20), seed=30)
  # The stop id: a token greedy decoding of prompt 0 first produces at a position >= 2.
  free_run = checkpoint.greedy(prompts[0], MAX_TOKENS)
  eos_position = next(i for i in range(2, MAX_TOKENS) if free_run[i] not in free_run[:i])
  eos = free_run[eos_position]
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, tokenizer.eos_id]}))
  stop_ids = sorted({eos, tokenizer.eos_id, tokenizer.pad_id})

  def reference(prompt_ids):
    """transformers' greedy tokens as JetStream streams them: up to the first stop id, which is not sent."""
    tokens = checkpoint.greedy(prompt_ids, MAX_TOKENS, stop_ids)
    return tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens

  return dict(directory=directory, reference=reference, prompts=prompts, tokenizer=tokenizer,
              eos_position=eos_position)


# First in the file, so that it runs before the module's shared server starts (two servers would share the CPU).
def test_a_training_checkpoint_is_served_with_its_policy_files(served_checkpoint, tmp_path):
  step_dir = save_as_training_checkpoint(served_checkpoint["directory"], tmp_path / "workdir")
  prompt = served_checkpoint["prompts"][0]
  with _running_server(os.path.dirname(step_dir)) as (stub, _):
    token_ids, _ = _decode(stub, jetstream_pb2.DecodeRequest(
        token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=prompt), max_tokens=MAX_TOKENS))
  # It stops at the eos of the generation config copied into policy/.
  assert token_ids == served_checkpoint["reference"](prompt)
  assert len(token_ids) == served_checkpoint["eos_position"]


@pytest.fixture(scope="module")
def server(served_checkpoint):
  """A running server on the Hugging Face directory; the fixture dict of `served_checkpoint` with its stub and
  process."""
  with _running_server(served_checkpoint["directory"]) as (stub, process):
    yield dict(served_checkpoint, stub=stub, process=process)


def _decode(stub, request: jetstream_pb2.DecodeRequest) -> tuple[list[int], str]:
  token_ids, text = [], []
  for response in stub.Decode(request, timeout=120):
    sample, = response.stream_content.samples
    token_ids += list(sample.token_ids)
    text.append(sample.text)
  return token_ids, "".join(text)


def test_health_check(server):
  assert server["stub"].HealthCheck(jetstream_pb2.HealthCheckRequest(), timeout=30).is_live


def test_concurrent_token_requests_return_transformers_greedy_tokens(server):
  stub, prompts = server["stub"], server["prompts"]
  requests = [jetstream_pb2.DecodeRequest(
      token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=prompt), max_tokens=MAX_TOKENS)
      for prompt in prompts]
  # Five requests on two decode slots: the orchestrator queues them and refills slots as requests end.
  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    results = list(pool.map(lambda request: _decode(stub, request), requests))
  expected = [server["reference"](prompt) for prompt in prompts]
  assert len(expected[0]) == server["eos_position"]  # prompt 0 stops at its eos, which is not streamed
  assert MAX_TOKENS in {len(tokens) for tokens in expected}  # and some request runs to max_tokens
  assert [token_ids for token_ids, _ in results] == expected


def test_text_request_is_tokenized_without_bos_and_detokenized(server):
  tokenizer = server["tokenizer"]
  text = "The quick brown fox"
  token_ids, streamed_text = _decode(server["stub"], jetstream_pb2.DecodeRequest(
      text_content=jetstream_pb2.DecodeRequest.TextContent(text=text), max_tokens=MAX_TOKENS))
  assert token_ids == server["reference"](tokenizer.encode(text))
  assert streamed_text == "".join(tokenizer.decode([token_id]) for token_id in token_ids)
  assert server["process"].poll() is None  # still serving
