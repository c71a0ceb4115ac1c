"""Trajectories -> arrays for the jitted passes: packed micro-batches formed by a token budget, and `collate`.

Training (`training_batches`) packs trajectories, prompt then response, one after another into rows, as verl's
remove-padding does (`pack`: segment ids, positions restarting per trajectory, per-token values aligned to the
token predicted). Row widths are length buckets (`row_width_bucket`: four per doubling) capped at the longest
trajectory the config allows (data.max_prompt_length + data.max_response_length), so the jitted passes compile
once per bucket rather than once per batch. Rows are filled first-fit in the batch's own order (so a run is
reproducible).
`collate` is the unpacked layout (prompts left-padded, responses right-padded) that SFT uses.
"""
from collections.abc import Sequence

import numpy as np


def bucket_length(length: int, minimum: int = 8) -> int:
  """The smallest power of two >= length (and >= minimum)."""
  return max(minimum, 1 << max(0, int(length) - 1).bit_length())


def capped_bucket_length(length: int, maximum: int | None = None, bucket=bucket_length) -> int:
  """`bucket(length)` (`bucket_length` or `row_width_bucket`), but no wider than `maximum` (the longest length
  allowed) when one is given."""
  if maximum is not None and length > maximum:
    raise ValueError(f"capped_bucket_length: length {length} is over the maximum width {maximum}")
  width = bucket(length)
  return width if maximum is None else min(width, maximum)


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int,
            prompt_width: int | None = None, response_width: int | None = None,
            max_prompt_width: int | None = None, max_response_width: int | None = None) -> dict[str, np.ndarray]:
  """prompt_ids/prompt_mask [B, P] (left-padded) and response_ids/response_mask [B, R] (right-padded).

  Widths default to the length bucket of the longest prompt / response, capped at `max_prompt_width` /
  `max_response_width` when given (the config's data.max_prompt_length / data.max_response_length).
  """
  if len(prompts) != len(responses):
    raise ValueError(f"collate: {len(prompts)} prompts but {len(responses)} responses")
  longest_prompt = max((len(p) for p in prompts), default=1)
  longest_response = max((len(r) for r in responses), default=1)
  for name, longest, maximum in (("prompt", longest_prompt, max_prompt_width),
                                 ("response", longest_response, max_response_width)):
    if maximum is not None and longest > maximum:
      raise ValueError(f"collate: a {name} of {longest} tokens is longer than max_{name}_width ({maximum}), the "
                       f"config's data.max_{name}_length")
  prompt_width = prompt_width or capped_bucket_length(longest_prompt, max_prompt_width)
  response_width = response_width or capped_bucket_length(longest_response, max_response_width)
  if longest_prompt > prompt_width or longest_response > response_width:
    raise ValueError(f"collate: a prompt ({longest_prompt}) or response ({longest_response}) is longer than its "
                     f"width ({prompt_width} / {response_width})")
  if any(len(p) == 0 for p in prompts):
    raise ValueError("collate: empty prompt (a response needs at least one token to condition on)")
  batch = len(prompts)
  prompt_ids = np.full((batch, prompt_width), pad_id, np.int32)
  prompt_mask = np.zeros((batch, prompt_width), np.int32)
  response_ids = np.full((batch, response_width), pad_id, np.int32)
  response_mask = np.zeros((batch, response_width), np.int32)
  for row, (prompt, response) in enumerate(zip(prompts, responses)):
    prompt_ids[row, prompt_width - len(prompt):] = prompt
    prompt_mask[row, prompt_width - len(prompt):] = 1
    response_ids[row, :len(response)] = response
    response_mask[row, :len(response)] = 1
  return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
          "response_mask": response_mask}


def row_width_bucket(length: int, minimum: int = 8) -> int:
  """The smallest width of the form m * 2^k, m in {4, 5, 6, 7}, that holds `length` (and >= minimum): four steps
  per doubling (..., 32, 40, 48, 56, 64, 80, ...), so a row wastes at most a fifth of its width on the bucket
  rather than half, for up to four compiled shapes per doubling instead of one."""
  if length <= minimum:
    return minimum
  step = max(1, (1 << (int(length) - 1).bit_length() - 1) // 4)
  return -(-int(length) // step) * step


def packed_row_width(lengths: Sequence[int], max_width: int) -> int:
  """The row width of packed micro-batches: the `row_width_bucket` of the longest trajectory (prompt +
  response), capped at `max_width` (data.max_prompt_length + data.max_response_length)."""
  return capped_bucket_length(max(lengths, default=1), max_width, bucket=row_width_bucket)


def training_batches(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     sampler_logps: Sequence[np.ndarray], advantages: np.ndarray, loss_masked: np.ndarray, *,
                     rows_per_update: int, micro_batch_tokens: int, pad_id: int, max_prompt_width: int,
                     max_response_width: int) -> list[list[dict[str, np.ndarray]]]:
  """A rollout step's trajectories as mini-batches of `rows_per_update` consecutive trajectories, each a list of
  packed micro-batches (`pack`) with the response mask zeroed on the trajectories of `loss_masked` (overlong
  filtering).

  The token budget, actor.micro_batch_tokens: the tokens, real and padding, of one micro-batch on one host,
  rows x row width. The row width is `packed_row_width` of the mini-batch's trajectories (so at most
  `max_prompt_width + max_response_width`); the mini-batch's trajectories are packed into rows first-fit in
  their order (`pack_rows`), and consecutive rows form micro-batches of `micro_batch_tokens // width` rows (at
  least one; the last may have fewer).
  """
  mini_batches = []
  for start in range(0, len(responses), rows_per_update):
    picked = list(range(start, min(start + rows_per_update, len(responses))))
    lengths = [len(prompts[i]) + len(responses[i]) for i in picked]
    for i in picked:
      if len(prompts[i]) > max_prompt_width or len(responses[i]) > max_response_width:
        raise ValueError(f"training_batches: trajectory {i} ({len(prompts[i])} prompt + {len(responses[i])} "
                         f"response tokens) is longer than data.max_prompt_length ({max_prompt_width}) or "
                         f"data.max_response_length ({max_response_width})")
    width = packed_row_width(lengths, max_prompt_width + max_response_width)
    rows = [[picked[j] for j in row] for row in pack_rows(lengths, width)]
    rows_per_micro = max(1, micro_batch_tokens // width)
    mini_batches.append([pack(prompts, responses, rows[first:first + rows_per_micro], row_width=width,
                              pad_id=pad_id, advantages=advantages, sampler_logps=sampler_logps,
                              loss_masked=loss_masked)
                         for first in range(0, len(rows), rows_per_micro)])
  return mini_batches


def pack_rows(lengths: Sequence[int], row_width: int) -> list[list[int]]:
  """First-fit packing in the given order: each trajectory goes into the first row with room for it (rows of
  `row_width` tokens), so the layout is reproducible. Returns each row's trajectory indices in order."""
  rows: list[list[int]] = []
  free: list[int] = []
  for index, length in enumerate(lengths):
    if length > row_width:
      raise ValueError(f"pack_rows: a trajectory of {length} tokens is longer than the row width {row_width}")
    for r, room in enumerate(free):
      if length <= room:
        rows[r].append(index)
        free[r] -= length
        break
    else:
      rows.append([index])
      free.append(row_width - length)
  return rows


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], *,
         row_width: int, pad_id: int, advantages: Sequence[float] | None = None,
         sampler_logps: Sequence[np.ndarray] | None = None, loss_masked: Sequence[bool] | None = None
         ) -> dict[str, np.ndarray]:
  """Trajectories (prompt + response) laid out one after another in rows of `row_width` tokens (`rows`: each
  row's trajectory indices, e.g. from `pack_rows`), verl's remove-padding layout:

    input_ids [N, W]: the tokens, `pad_id` after the last trajectory of a row;
    segment_ids [N, W]: the trajectory's number within its row, 1-based; 0 on padding;
    positions [N, W]: rotary positions, counting from 0 at each trajectory's first token;
    response_mask [N, W]: 1 where the token is a response token. Per-token values are aligned to the token they
      are about: logp[t] = log p(input_ids[t] | the trajectory's tokens before t), predicted from position t - 1
      (a trajectory's first token is a prompt token, so no response token is predicted across trajectories);
    advantages [N, W] and sampler_logp [N, W] (when given): each response token's value, 0 elsewhere.
  A trajectory of `loss_masked` (overlong filtering) is laid out as the others, with response_mask 0.
  """
  ids = np.full((len(rows), row_width), pad_id, np.int32)
  out = {"input_ids": ids, "segment_ids": np.zeros_like(ids), "positions": np.zeros_like(ids),
         "response_mask": np.zeros_like(ids)}
  if advantages is not None:
    out["advantages"] = np.zeros(ids.shape, np.float32)
  if sampler_logps is not None:
    out["sampler_logp"] = np.zeros(ids.shape, np.float32)
  for r, row in enumerate(rows):
    start = 0
    for segment, i in enumerate(row, start=1):
      prompt, response = prompts[i], responses[i]
      if len(prompt) == 0:
        raise ValueError("pack: empty prompt (a response needs at least one token to condition on)")
      length, resp = len(prompt) + len(response), slice(start + len(prompt), start + len(prompt) + len(response))
      if start + length > row_width:
        raise ValueError(f"pack: row {r} holds {start + length} tokens, more than its width {row_width}")
      ids[r, start:start + length] = np.concatenate([np.asarray(prompt, np.int32), np.asarray(response, np.int32)])
      out["segment_ids"][r, start:start + length] = segment
      out["positions"][r, start:start + length] = np.arange(length)
      out["response_mask"][r, resp] = 0 if loss_masked is not None and loss_masked[i] else 1
      if advantages is not None:
        out["advantages"][r, resp] = advantages[i]
      if sampler_logps is not None:
        out["sampler_logp"][r, resp] = sampler_logps[i]
      start += length
  return out
