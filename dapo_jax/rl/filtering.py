"""Dynamic sampling: keep only groups whose responses disagree, until a training batch is full (docs/algorithm.md 4).

A group is one draw of one prompt: its `n` responses. A group whose filter metric has zero spread (all right,
or all wrong) gets zero advantage everywhere and teaches nothing, so DAPO drops it and samples more prompts
until `train_batch_size` groups are kept.

`filter_groups` is the whole-generation-batch form of the rule. `DynamicSampler` is the streaming form the
training loop drives while groups finish in any order: prompts are admitted progressively, sampling stops as
soon as the batch is decided, and the selection is by prompt (draw) order, never by completion order.

The training loop's side of the protocol (drawing prompts, admitting them to the sampler, scoring finished
groups, cancelling `SelectedBatch.discarded_group_ids`) is `dapo_jax/rollout_collection.py`, which drives this
state machine.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

FILTER_METRICS = ("acc", "score", "reward")
"""Per-response values a group can be filtered on (`algorithm.filter_groups.metric`): `acc` the unshaped
correctness (DAPO's default), `score` the rule-based score, `reward` the shaped reward (score + overlong
penalty)."""

STATE_VERSION = 1
"""Version of the `DynamicSampler.state_dict` layout."""


class DynamicSamplingExhausted(RuntimeError):
  """The generation-batch budget (`algorithm.filter_groups.max_num_gen_batches`) cannot fill a training batch."""


def keeps_group(metric_values: npt.ArrayLike) -> bool:
  """The DAPO keep rule: the population (ddof=0) std of the group's metric is > 0, or it has one response.

  The std is > 0 exactly when the values are not all equal; comparing max and min says so without the rounding
  of a computed std (`np.std` of three 0.1s is 1.4e-17, not 0, which would keep a group with no signal).
  """
  values = np.asarray(metric_values, dtype=np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError("a group needs at least one response")
  return bool(values.size == 1 or values.max() > values.min())


def filter_groups(metric_values_per_group: Sequence[npt.ArrayLike] | npt.ArrayLike) -> np.ndarray:
  """`[num_groups]` bool: which groups the DAPO rule keeps (`keeps_group` for each group's metric values).

  For whole generation batches: pass `[num_groups, n]` values (or one sequence per group), then take the first
  `train_batch_size` kept groups in prompt order (docs/algorithm.md section 4).
  """
  return np.array([keeps_group(values) for values in metric_values_per_group], dtype=bool).reshape(-1)


@dataclasses.dataclass(frozen=True)
class SelectedBatch:
  """The groups of one rollout step, as `DynamicSampler.take_batch` returns them.

  Attributes:
    group_ids: the `train_batch_size` selected groups, in prompt (draw) order.
    payloads: the payload given to `add_group` for each of them, in the same order.
    discarded_group_ids: groups opened this step that had not finished when the batch was decided (in flight
      in the engine, or not admitted yet), in draw order: cancel them and drop their prompts; their prompts
      count as consumed.
    metrics: `train/num_gen_batches` (generation batches opened this step), `train/kept_groups` and
      `train/dropped_groups` (groups finished this step that passed / failed the filter, whether or not they
      landed in the batch), `train/surplus_groups` (passed the filter but came after the batch was full),
      `train/carried_groups` (surplus groups carried into the next step; 0 without carry-over),
      `train/unfinished_groups` (`len(discarded_group_ids)`), and `train/raw_acc` (mean `acc` over every
      response of every group finished this step, before filtering; NaN when no group finished this step,
      which happens only when carried-over groups alone fill the batch).
  """
  group_ids: list[int]
  payloads: list[Any]
  discarded_group_ids: list[int]
  metrics: dict[str, float]


@dataclasses.dataclass
class _FinishedGroup:
  group_id: int
  metric_values: list[float]
  acc_values: list[float]
  kept: bool
  payload: Any


class DynamicSampler:
  """Streaming dynamic sampling, docs/algorithm.md section 4: a state machine the training loop drives.

  Group ids. `open_gen_batch` hands out consecutive integer ids, continuing one counter over the whole run, so
  a group id is its draw's position in the stream of drawn prompts; it is also the prompt order. Each draw is
  its own group, even when the dataset repeats a problem.

  One rollout step:
    1. Whenever `needs_more_prompts()` is True, the groups opened so far cannot fill the batch even if every
       unfinished one were kept: call `open_gen_batch()` and draw that many prompts. Past
       `max_num_gen_batches` (> 0, with filtering enabled) this raises `DynamicSamplingExhausted`.
    2. Admit the opened prompts to the engine in draw order, as it has room, while `wants_group(group_id)`:
       once False for a group it stays False for it and every later one (they cannot make the batch).
    3. Report each finished group, in any order, with `add_group(group_id, values, payload)`.
    4. The batch is decided (`is_decided()`) when every group drawn before the `train_batch_size`-th kept
       group (in draw order) has finished; so a group that finishes late but was drawn early still takes its
       slot, and the batch does not favour short responses. Then `take_batch()` returns the selection, the ids
       to cancel and the step's metrics, and starts the next step.

  With `enabled=False` every finished group is kept: the batch is the first `train_batch_size` groups drawn,
  and `max_num_gen_batches` does not apply (as in verl, where it belongs to the filter). A group of one
  response is always kept. With `carry_over=True`, kept groups beyond the full batch are not dropped but put
  first in the next step's batch (still in draw order); their responses then come from the policy of the step
  before, one step off-policy, which is why it is opt-in (verl drops them).

  Checkpoints. `state_dict()` is only allowed between rollout steps (after `take_batch`, before the next
  `open_gen_batch`), when nothing is in flight: it holds the id counter and the carried-over groups (none
  without carry-over), as plain JSON-able values. Carried-over payloads are stored as given, or through
  `encode_payload` (and restored with `decode_payload` in `load_state_dict`) when they are not JSON-able
  themselves (token arrays, for instance).
  """

  def __init__(
      self,
      *,
      train_batch_size: int,
      n: int,
      gen_batch_size: int,
      max_num_gen_batches: int = 0,
      metric: str = "acc",
      enabled: bool = True,
      carry_over: bool = False,
  ):
    """Configures the sampler.

    Args:
      train_batch_size: groups (prompts) in a training batch (`data.train_batch_size`).
      n: responses per group (`rollout.n`).
      gen_batch_size: prompts in a generation batch (`data.gen_batch_size`).
      max_num_gen_batches: generation batches a step may open before failing; <= 0 means unlimited
        (`algorithm.filter_groups.max_num_gen_batches`).
      metric: the filter metric, one of `FILTER_METRICS` (`algorithm.filter_groups.metric`).
      enabled: filter groups (`algorithm.filter_groups.enable`); False keeps every group.
      carry_over: carry surplus kept groups into the next step instead of dropping them.
    """
    for name, value in (("train_batch_size", train_batch_size), ("n", n), ("gen_batch_size", gen_batch_size)):
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if metric not in FILTER_METRICS:
      raise ValueError(f"algorithm.filter_groups.metric must be one of {FILTER_METRICS}; got {metric!r}")
    self.train_batch_size = int(train_batch_size)
    self.n = int(n)
    self.gen_batch_size = int(gen_batch_size)
    self.max_num_gen_batches = int(max_num_gen_batches)
    self.metric = metric
    self.enabled = bool(enabled)
    self.carry_over = bool(carry_over)
    self._next_group_id = 0
    self._carried: list[_FinishedGroup] = []
    self._start_step()

  # ------------------------------------------------------------------------------------------------------------
  # Step state
  # ------------------------------------------------------------------------------------------------------------

  def _start_step(self) -> None:
    """Resets the per-step state; carried-over groups (already finished and kept) open the new step."""
    self._num_gen_batches = 0
    self._step_first_id = self._next_group_id  # ids opened this step are [_step_first_id, _next_group_id)
    self._finished: dict[int, _FinishedGroup] = {}
    self._finished_ids_sorted: list[int] = []  # finished this step, for counting finished ids below a bound
    self._kept_ids_sorted: list[int] = []  # finished this step and kept
    # The decision walks the groups in draw order: carried-over groups first, then the ids opened this step.
    # `_frontier` is the first opened id not yet known to be finished; `_kept_in_prefix` counts kept groups
    # before it (carried-over included) and `_cut` is the id after the last selected group once decided.
    self._frontier = self._step_first_id
    self._kept_in_prefix = min(len(self._carried), self.train_batch_size)
    self._cut: int | None = self._step_first_id if len(self._carried) >= self.train_batch_size else None

  @property
  def _every_group_kept(self) -> bool:
    """Whether every group that finishes is kept regardless of its values (so unfinished ones count as kept)."""
    return not self.enabled or self.n == 1

  @property
  def num_gen_batches(self) -> int:
    """Generation batches opened in this rollout step."""
    return self._num_gen_batches

  @property
  def num_kept(self) -> int:
    """Kept groups available to this step: finished this step and passed the filter, plus carried-over ones."""
    return len(self._kept_ids_sorted) + len(self._carried)

  @property
  def num_unfinished(self) -> int:
    """Groups opened this step that have not finished (in flight or not admitted yet)."""
    return (self._next_group_id - self._step_first_id) - len(self._finished)

  def _budget_spent(self) -> bool:
    return (self.enabled and self.max_num_gen_batches > 0 and self._num_gen_batches >= self.max_num_gen_batches)

  # ------------------------------------------------------------------------------------------------------------
  # The protocol
  # ------------------------------------------------------------------------------------------------------------

  def is_decided(self) -> bool:
    """Whether the batch is known: every group drawn before the `train_batch_size`-th kept one has finished."""
    return self._cut is not None

  def needs_more_prompts(self) -> bool:
    """Whether another generation batch must be opened: not decided, and kept + unfinished < train_batch_size.

    While False and undecided, the groups already opened may still fill the batch: wait for them to finish.
    """
    return not self.is_decided() and self.num_kept + self.num_unfinished < self.train_batch_size

  def wants_group(self, group_id: int) -> bool:
    """Whether the opened group `group_id` could still be selected, i.e. is worth admitting to the engine.

    False once `train_batch_size` groups drawn before it are kept for certain (finished and kept, carried over,
    or unfinished when every group is kept), and then for good.
    """
    self._check_open(group_id)
    if self.is_decided():
      return group_id < self._cut
    certain = len(self._carried) + bisect.bisect_left(self._kept_ids_sorted, group_id)
    if self._every_group_kept:
      finished_before = bisect.bisect_left(self._finished_ids_sorted, group_id)
      certain += (group_id - self._step_first_id) - finished_before
    return certain < self.train_batch_size

  def open_gen_batch(self, num_prompts: int | None = None) -> list[int]:
    """Announces the next generation batch of drawn prompts; returns their group ids, in draw order.

    Args:
      num_prompts: prompts in this generation batch; defaults to `gen_batch_size`.

    Opening one while `needs_more_prompts()` is False (to keep the engine busy) is allowed within the budget,
    but its prompts are consumed even if none of them is needed.

    Raises:
      DynamicSamplingExhausted: `max_num_gen_batches` generation batches were opened this step and they cannot
        fill the batch (`needs_more_prompts()` is True).
      RuntimeError: the budget is spent but the unfinished groups may still fill the batch, or the batch is
        already decided.
    """
    if self.is_decided():
      raise RuntimeError("the batch is already decided; call take_batch() before opening generation batches")
    if self._budget_spent() and not self.needs_more_prompts():
      raise RuntimeError(
          f"algorithm.filter_groups.max_num_gen_batches={self.max_num_gen_batches} generation batches are open "
          f"and their {self.num_unfinished} unfinished groups may still fill the batch: wait for them, and open "
          f"a generation batch only when needs_more_prompts() is True")
    if self._budget_spent():
      drawn = self._next_group_id - self._step_first_id
      raise DynamicSamplingExhausted(
          f"Dynamic sampling kept {self.num_kept} of the {self.train_batch_size} groups a training batch needs "
          f"after {self._num_gen_batches} generation batches ({drawn} prompts drawn this step, "
          f"{self.num_unfinished} of them unfinished), and algorithm.filter_groups.max_num_gen_batches="
          f"{self.max_num_gen_batches} allows no more. Groups whose {self.n} responses all have the same "
          f"{self.metric!r} are dropped, so the data is probably too hard or too easy for the model. Raise "
          f"algorithm.filter_groups.max_num_gen_batches (<= 0 means unlimited), raise data.gen_batch_size "
          f"(now {self.gen_batch_size}), or turn off algorithm.filter_groups.enable.")
    num_prompts = self.gen_batch_size if num_prompts is None else int(num_prompts)
    if num_prompts < 1:
      raise ValueError(f"a generation batch needs at least one prompt; got {num_prompts}")
    first = self._next_group_id
    self._next_group_id += num_prompts
    self._num_gen_batches += 1
    return list(range(first, self._next_group_id))

  def add_group(self, group_id: int, values: Mapping[str, npt.ArrayLike], payload: Any = None) -> bool:
    """Reports a finished group, in any order; returns whether the filter keeps it.

    Args:
      group_id: an id from `open_gen_batch` in this step, not reported before.
      values: per-response values by name, each of length `n`: `"acc"` (for `train/raw_acc`) and the filter
        metric (`metric`), e.g. `{"acc": [1, 0, ...], "score": [...], "reward": [...]}`. Other keys are ignored.
      payload: anything; returned by `take_batch` if the group is selected (and saved by `state_dict` if it is
        carried over).
    """
    self._check_open(group_id)
    if group_id in self._finished:
      raise ValueError(f"group {group_id} was already reported")
    for key in dict.fromkeys(("acc", self.metric)):
      if key not in values:
        raise KeyError(f"add_group needs per-response {key!r} values (filter metric {self.metric!r}); "
                       f"got keys {sorted(values)}")
    metric_values = [float(v) for v in np.asarray(values[self.metric], dtype=np.float64).reshape(-1)]
    acc_values = [float(v) for v in np.asarray(values["acc"], dtype=np.float64).reshape(-1)]
    if len(metric_values) != self.n or len(acc_values) != self.n:
      raise ValueError(f"group {group_id} has {len(metric_values)} {self.metric!r} and {len(acc_values)} 'acc' "
                       f"values; every group has n={self.n} responses")
    kept = self._every_group_kept or keeps_group(metric_values)
    self._finished[group_id] = _FinishedGroup(group_id, metric_values, acc_values, kept, payload)
    bisect.insort(self._finished_ids_sorted, group_id)
    if kept:
      bisect.insort(self._kept_ids_sorted, group_id)
    self._advance_frontier()
    return kept

  def _advance_frontier(self) -> None:
    """Walks the finished prefix in draw order and fixes the cut once it holds `train_batch_size` kept groups."""
    while self._cut is None and self._frontier in self._finished:
      if self._finished[self._frontier].kept:
        self._kept_in_prefix += 1
      self._frontier += 1
      if self._kept_in_prefix == self.train_batch_size:
        self._cut = self._frontier

  def _check_open(self, group_id: int) -> None:
    if not (isinstance(group_id, (int, np.integer)) and self._step_first_id <= group_id < self._next_group_id):
      raise KeyError(f"group id {group_id!r} was not opened in this rollout step (open ids: "
                     f"[{self._step_first_id}, {self._next_group_id})); groups discarded by take_batch "
                     f"must not be reported")

  def take_batch(self) -> SelectedBatch:
    """Returns the decided batch (`SelectedBatch`) and starts the next rollout step."""
    if not self.is_decided():
      raise RuntimeError(f"the batch is not decided yet ({self._kept_in_prefix} of {self.train_batch_size} kept "
                         f"groups in the finished prefix); keep sampling")
    step_kept = [self._finished[i] for i in self._kept_ids_sorted]
    selected = (self._carried + [g for g in step_kept if g.group_id < self._cut])[:self.train_batch_size]
    surplus = [g for g in step_kept if g.group_id >= self._cut]
    # Carried-over groups beyond the batch (carried_in > train_batch_size) go on to the next step too.
    surplus = self._carried[self.train_batch_size:] + surplus
    discarded = [i for i in range(self._step_first_id, self._next_group_id) if i not in self._finished]
    finished = list(self._finished.values())
    accs = [a for g in finished for a in g.acc_values]
    metrics = {
        "train/num_gen_batches": float(self._num_gen_batches),
        "train/kept_groups": float(len(step_kept)),
        "train/dropped_groups": float(len(finished) - len(step_kept)),
        "train/surplus_groups": float(len(surplus)),
        "train/carried_groups": float(len(surplus) if self.carry_over else 0),
        "train/unfinished_groups": float(len(discarded)),
        "train/raw_acc": float(np.mean(accs)) if accs else float("nan"),
    }
    batch = SelectedBatch(group_ids=[g.group_id for g in selected], payloads=[g.payload for g in selected],
                          discarded_group_ids=discarded, metrics=metrics)
    self._carried = surplus if self.carry_over else []
    self._start_step()
    return batch

  def abandon_step(self) -> None:
    """Ends a rollout step that cannot be completed (the data ran out): the groups opened in it are dropped
    (their prompts count as consumed) and the sampler is between steps again, so its state can be saved.
    Carried-over groups stay for the next step."""
    self._start_step()

  # ------------------------------------------------------------------------------------------------------------
  # Checkpointing
  # ------------------------------------------------------------------------------------------------------------

  def _check_between_steps(self, action: str) -> None:
    if self._next_group_id != self._step_first_id:
      raise RuntimeError(f"cannot {action} in the middle of a rollout step ({self._num_gen_batches} generation "
                         f"batches open); checkpoint between rollout steps, after take_batch()")

  def state_dict(self, encode_payload: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The sampler's state between rollout steps, as JSON-able values (see the class docstring).

    Args:
      encode_payload: maps a carried-over group's payload to a JSON-able value; None stores it as is.
    """
    self._check_between_steps("save the dynamic sampler's state")
    encode = encode_payload or (lambda payload: payload)
    return {
        "version": STATE_VERSION,
        "next_group_id": self._next_group_id,
        "carried_groups": [{"group_id": g.group_id, "metric_values": list(g.metric_values),
                            "acc_values": list(g.acc_values), "payload": encode(g.payload)}
                           for g in self._carried],
    }

  def load_state_dict(self, state: Mapping[str, Any], decode_payload: Callable[[Any], Any] | None = None) -> None:
    """Restores `state_dict()`'s state into this sampler (configured by its constructor, which may differ).

    Args:
      state: a `state_dict()` result, possibly after a JSON round trip.
      decode_payload: inverse of the `encode_payload` the state was saved with; None uses the stored value.
    """
    self._check_between_steps("load a dynamic sampler state")
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"unsupported dynamic sampler state version {state.get('version')!r}; "
                       f"expected {STATE_VERSION}")
    decode = decode_payload or (lambda payload: payload)
    carried = []
    for entry in state["carried_groups"]:
      if len(entry["metric_values"]) != self.n:
        raise ValueError(f"carried-over group {entry['group_id']} has {len(entry['metric_values'])} responses "
                         f"but rollout.n is now {self.n}")
      # Carried groups were kept under the filter they were sampled with; they stay kept.
      carried.append(_FinishedGroup(int(entry["group_id"]), [float(v) for v in entry["metric_values"]],
                                    [float(v) for v in entry["acc_values"]], True, decode(entry["payload"])))
    if not self.carry_over and carried:
      raise ValueError(f"the state carries over {len(carried)} groups but this sampler has carry_over=False")
    self._next_group_id = int(state["next_group_id"])
    self._carried = carried
    self._start_step()
