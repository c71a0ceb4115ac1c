"""Trajectories -> padded arrays for the jitted passes, and micro-batches formed by a token budget.

The layout is `dapo_jax/rl/step.py`'s: prompts left-padded, responses right-padded. Widths are rounded up to
powers of two (length buckets) so that the jitted passes compile once per bucket rather than once per batch,
and capped at the longest width the config allows (data.max_prompt_length / data.max_response_length): a
20,480-token response then pads to 20,480 columns, not 32,768 (attention's memory grows with the width squared).
Micro-batches are packed like verl's dynamic batch size: consecutive trajectories in the batch's own order (so
a run is reproducible), until the padded token count would pass the budget.
"""
from collections.abc import Sequence

import numpy as np


def bucket_length(length: int, minimum: int = 8) -> int:
  """The smallest power of two >= length (and >= minimum)."""
  return max(minimum, 1 << max(0, int(length) - 1).bit_length())


def capped_bucket_length(length: int, maximum: int | None = None) -> int:
  """`bucket_length(length)`, but no wider than `maximum` (the longest length allowed) when one is given."""
  if maximum is not None and length > maximum:
    raise ValueError(f"capped_bucket_length: length {length} is over the maximum width {maximum}")
  bucket = bucket_length(length)
  return bucket if maximum is None else min(bucket, maximum)


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


def split_by_token_budget(prompt_lengths: Sequence[int], response_lengths: Sequence[int], token_budget: int, *,
                          max_prompt_width: int | None = None, max_response_width: int | None = None
                          ) -> list[list[int]]:
  """Consecutive index groups whose padded size (rows x bucketed prompt + response width) fits the budget.

  Widths are counted as `collate` pads them, given the same `max_prompt_width` / `max_response_width`. A single
  trajectory longer than the budget gets a micro-batch of its own (the config check makes the budget hold one
  full-length trajectory, so this happens only for budgets set by hand).
  """
  groups: list[list[int]] = []
  current: list[int] = []
  widest_prompt = widest_response = 0
  for index, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
    new_prompt, new_response = max(widest_prompt, p), max(widest_response, r)
    padded = (len(current) + 1) * (capped_bucket_length(new_prompt, max_prompt_width)
                                   + capped_bucket_length(new_response, max_response_width))
    if current and padded > token_budget:
      groups.append(current)
      current, new_prompt, new_response = [], p, r
    current.append(index)
    widest_prompt, widest_response = new_prompt, new_response
  if current:
    groups.append(current)
  return groups


def training_batches(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     sampler_logps: Sequence[np.ndarray], advantages: np.ndarray, loss_masked: np.ndarray, *,
                     rows_per_update: int, micro_batch_tokens: int, pad_id: int, max_prompt_width: int,
                     max_response_width: int) -> list[list[dict[str, np.ndarray]]]:
  """A rollout step's trajectories as mini-batches of `rows_per_update` consecutive trajectories, each a list of
  micro-batches (`collate`d, split by `micro_batch_tokens`) with `advantages` [B], `sampler_logp` [B, R], and
  the response mask zeroed on the rows of `loss_masked` (overlong filtering).

  Widths stop at `max_prompt_width` / `max_response_width`, the longest lengths the config allows.
  """
  widths = dict(max_prompt_width=max_prompt_width, max_response_width=max_response_width)
  mini_batches = []
  for start in range(0, len(responses), rows_per_update):
    rows = list(range(start, min(start + rows_per_update, len(responses))))
    micro_rows = split_by_token_budget([len(prompts[i]) for i in rows], [len(responses[i]) for i in rows],
                                       micro_batch_tokens, **widths)
    micro_batches = []
    for micro in micro_rows:
      picked = [rows[i] for i in micro]
      mb = collate([prompts[i] for i in picked], [responses[i] for i in picked], pad_id=pad_id, **widths)
      width = mb["response_ids"].shape[1]
      mb["response_mask"] = mb["response_mask"] * (~loss_masked[picked])[:, None].astype(np.int32)
      mb["advantages"] = advantages[picked]
      mb["sampler_logp"] = np.stack([np.pad(sampler_logps[i], (0, width - len(sampler_logps[i]))) for i in picked])
      micro_batches.append(mb)
    mini_batches.append(micro_batches)
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
         sampler_logps: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Trajectories (prompt + response) laid out one after another in rows of `row_width` tokens (`rows`: each
  row's trajectory indices, e.g. from `pack_rows`), verl's remove-padding layout:

    input_ids [N, W]: the tokens, `pad_id` after the last trajectory of a row;
    segment_ids [N, W]: the trajectory's number within its row, 1-based; 0 on padding;
    positions [N, W]: rotary positions, counting from 0 at each trajectory's first token;
    response_mask [N, W]: 1 where the token is a response token. Per-token values are aligned to the token they
      are about: logp[t] = log p(input_ids[t] | the trajectory's tokens before t), predicted from position t - 1
      (a trajectory's first token is a prompt token, so no response token is predicted across trajectories);
    advantages [N, W] and sampler_logp [N, W] (when given): each response token's value, 0 elsewhere.
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
      out["response_mask"][r, resp] = 1
      if advantages is not None:
        out["advantages"][r, resp] = advantages[i]
      if sampler_logps is not None:
        out["sampler_logp"][r, resp] = sampler_logps[i]
      start += length
  return out
