"""The host's bookkeeping of the paged KV cache: which pages are free, which pages each decode slot holds (the
page table that decode steps read), and pages shared by several slots (a group's prompt).

The pool is `page_shards` blocks of `pages_per_shard` pages, one block per shard of the slots
(`decode_state.state_layout`): slot s belongs to shard s // (num_slots // page_shards) and takes pages of that
block only, so its pages are on its own devices. Page numbers here are within a block; `global_pages` turns them
into pool indices (what `decoding.insert` writes to). A page is counted by its holders (slots, and a group while
it still has samples to start) and returns to its block's free list when the last one lets go.
"""
from collections.abc import Sequence

import numpy as np

from dapo_jax.rollout import decoding


class PageTable:
  """Free lists, holder counts and the [num_slots, pages_per_slot] page table of one paged pool."""

  def __init__(self, *, num_slots: int, page_shards: int, pages_per_shard: int, page_size: int,
               pages_per_slot: int):
    if num_slots % page_shards:
      raise ValueError(f"PageTable: {num_slots} slots do not split into {page_shards} page shards")
    self.num_slots = num_slots
    self.page_shards = page_shards
    self.pages_per_shard = pages_per_shard
    self.page_size = page_size
    self.pages_per_slot = pages_per_slot
    self.no_page = pages_per_shard  # a page number outside every block: writes there are dropped
    self.table = np.full((num_slots, pages_per_slot), self.no_page, np.int32)
    self._pages_held = np.zeros((num_slots,), np.int32)
    self._holders = np.zeros((page_shards, pages_per_shard), np.int32)
    # Free pages, taken from the end: the lowest numbers first, so that runs are reproducible.
    self._free = [list(range(pages_per_shard - 1, -1, -1)) for _ in range(page_shards)]

  @property
  def num_pages(self) -> int:
    return self.page_shards * self.pages_per_shard

  def shard_of(self, slot: int) -> int:
    return slot // (self.num_slots // self.page_shards)

  def free_pages(self, shard: int) -> int:
    return len(self._free[shard])

  def used_pages(self) -> int:
    return self.num_pages - sum(len(free) for free in self._free)

  def pages_held(self, slot: int) -> int:
    return int(self._pages_held[slot])

  def pages_for(self, entries: int) -> int:
    """Pages that hold `entries` cache entries."""
    return -(-entries // self.page_size)

  def allocate(self, shard: int, count: int) -> list[int]:
    """`count` free pages of the shard's block, each with one holder (the caller)."""
    if count > len(self._free[shard]):
      raise RuntimeError(f"page shard {shard} has {len(self._free[shard])} free pages, {count} asked for")
    pages = [self._free[shard].pop() for _ in range(count)]
    self._holders[shard, pages] = 1
    return pages

  def retain(self, shard: int, pages: Sequence[int]) -> None:
    self._holders[shard, list(pages)] += 1

  def release(self, shard: int, pages: Sequence[int]) -> None:
    for page in pages:
      self._holders[shard, page] -= 1
      if self._holders[shard, page] == 0:
        self._free[shard].append(page)

  def give(self, slot: int, pages: Sequence[int], retain: bool = False) -> None:
    """Appends pages to the slot's row (`retain`: pages another holder has too, e.g. a group's prompt pages)."""
    held = self.pages_held(slot)
    if held + len(pages) > self.pages_per_slot:
      raise RuntimeError(f"slot {slot} would hold {held + len(pages)} pages, more than {self.pages_per_slot}")
    if retain:
      self.retain(self.shard_of(slot), pages)
    self.table[slot, held:held + len(pages)] = pages
    self._pages_held[slot] = held + len(pages)

  def clear(self, slot: int) -> None:
    """Lets go of every page of the slot's row."""
    held = self.pages_held(slot)
    self.release(self.shard_of(slot), self.table[slot, :held].tolist())
    self.table[slot, :held] = self.no_page
    self._pages_held[slot] = 0

  def global_pages(self, shard: int, pages: Sequence[int]) -> list[int]:
    """Pool indices of a shard's pages."""
    return [shard * self.pages_per_shard + page for page in pages]

  def window(self, entries_needed: int, whole: bool) -> np.ndarray:
    """The page table columns a decode call passes: enough to cover `entries_needed` cache entries of every
    slot, as a power of two of pages (so a rollout compiles a handful of widths), or all columns (`whole`: for
    attention that reads only each slot's visible entries whatever the width, one compilation)."""
    if whole:
      return self.table
    width = 1 << max(self.pages_for(entries_needed) - 1, 0).bit_length()
    return self.table[:, :min(width, self.pages_per_slot)]


def full_length_table(num_slots: int, pages_per_slot: int) -> np.ndarray:
  """A page table in which slot s owns pages s * pages_per_slot ... for good: a full-length page budget per slot,
  for drivers that cannot preempt (JetStream's orchestrator cannot requeue a request)."""
  return np.arange(num_slots * pages_per_slot, dtype=np.int32).reshape(num_slots, pages_per_slot)


def prefix_into_slots(table: np.ndarray, prefix_rows, slots, bucket_length: int, page_size: int, response_keys,
                      positions=None):
  """`decoding.insert`'s arguments that copy prefix row `prefix_rows[i]` into the pages a `full_length_table`
  gives slot `slots[i]` and start a response there (at response position 0, or `positions[i]`): no page
  shared."""
  slots = np.asarray(slots, np.int32)
  bucket_pages = bucket_length // page_size
  pages = np.full((slots.size, bucket_pages), table.size, np.int32)
  width = min(bucket_pages, table.shape[1])
  pages[:, :width] = table[slots, :width]
  rows = np.asarray(prefix_rows, np.int32)
  positions = np.zeros_like(slots) if positions is None else np.asarray(positions, np.int32)
  return (decoding.PageWrites(rows=rows, pages=pages),
          decoding.SlotStarts(rows=rows, slots=slots, positions=positions, response_keys=response_keys))
