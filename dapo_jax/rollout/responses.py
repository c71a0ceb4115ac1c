"""What a rollout hands back: finished `Response`s, the `Group` of a prompt's responses, and finish reasons."""
import dataclasses

import numpy as np

FINISH_EOS = "eos"
FINISH_LENGTH = "length"


@dataclasses.dataclass(frozen=True)
class Response:
  """One finished response.

  Attributes:
    prompt_index: the prompt (group) it answers.
    sample_index: its place in the group, 0 .. n-1.
    token_ids: int32 [length]: the response tokens, the eos included when one ended it.
    logp_sampled: float32 [length]: each token's log-prob under the distribution it was drawn from (after
      top-k / top-p truncation; 0 for greedy).
    logp_full: float32 [length]: each token's log-prob under the untruncated temperature-scaled distribution.
    finish_reason: "eos" (an eos id ended it) or "length" (it reached the maximum response length).
  """
  prompt_index: int
  sample_index: int
  token_ids: np.ndarray
  logp_sampled: np.ndarray
  logp_full: np.ndarray
  finish_reason: str


@dataclasses.dataclass(frozen=True)
class Group:
  """The `n` responses of one prompt, in sample order."""
  prompt_index: int
  prompt_ids: np.ndarray
  responses: list[Response]
