"""Tests `python -m dapo_jax.serve`: JetStream's orchestrator and gRPC server around our engine, on loopback."""
import concurrent.futures
import json
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import grpc
import pytest

from dapo_jax.model.tokenizer import load_tokenizer
from jetstream.core.proto import jetstream_pb2
from jetstream.core.proto import jetstream_pb2_grpc
from tests.rollout.rollout_fixtures import random_prompts

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_TOKENS = 8
STARTUP_SECONDS = 240


def _free_port() -> int:
  with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
    probe.bind(("::", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(qwen_like_checkpoint, tmp_path_factory):
  """A running server (2 decode slots, greedy) on a checkpoint whose generation config stops on a token that
  greedy decoding of the first test prompt reaches; yields (stub, reference function, prompts)."""
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

  port = _free_port()
  process = subprocess.Popen(
      [sys.executable, "-m", "dapo_jax.serve", "--checkpoint", str(directory), "--port", str(port),
       "--num_slots", "2", "--max_prefill_length", "32", "--max_response_length", "16"],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  channel = grpc.insecure_channel(f"localhost:{port}")
  try:
    try:
      grpc.channel_ready_future(channel).result(timeout=STARTUP_SECONDS)
    except grpc.FutureTimeoutError:
      process.kill()
      pytest.fail(f"the server did not start in {STARTUP_SECONDS} s:\n{process.communicate()[0][-3000:]}")
    yield dict(stub=jetstream_pb2_grpc.OrchestratorStub(channel), reference=reference, prompts=prompts,
               tokenizer=tokenizer, process=process, eos_position=eos_position)
  finally:
    channel.close()
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()


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
