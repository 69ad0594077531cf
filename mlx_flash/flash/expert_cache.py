"""Which routed experts live in which slot of one MoE layer's fixed buffer (the expert counterpart of
neuron_cache.NeuronCache).

The buffer is a neuron_cache.NeuronBuffer whose rows are expert slots: per field of an expert's extent
(gate, up and down weights, their scales and biases), one packed (slots, bytes) array, allocated once,
never reallocated, seen by the layer's SwitchGLU as its stacked (slots, out, in) weights
(flash/experts.py). The router is an exact predictor, so the cache's job is the paper's window alone:

- hits: experts already in a slot are computed on in place;
- misses: read straight into free slots (BundleReader.read_into, parallel direct reads);
- eviction when a slot is needed: experts used within the last `window` tokens stay, the least
  recently used beyond them goes first. Slots are never emptied early (a kept expert costs nothing and
  may hit later), so the window and LRU give one order, least recently used first; evicting an expert
  from inside the window means the slots are too few for the window, and is counted (`window_evictions`).

It speaks NeuronCache's protocol (`step`, `commit`, `abort`, `buffer`, `n`, `stats.filled`), so
neuron_cache.load_active reads and places experts as it does neurons, prefetched ones included:

    new, slots = cache.step(experts)     # evicts, reserves a slot per expert not cached
    ... read expert new[k] into slot slots[k] ...
    cache.commit()                        # or abort(): nothing half-read is ever named by a slot
"""

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

NEVER = np.iinfo(np.int64).min // 2  # last use of an expert not used yet


@dataclass
class ExpertCacheStats:
    steps: int = 0  # window steps (a decode token, or a group of prompt tokens)
    needed: int = 0  # experts the steps needed, distinct per step
    hits: int = 0  # of those, already in a slot
    misses: int = 0  # of those, read (or taken from a prefetch)
    evicted: int = 0  # experts whose slot was given to another
    window_evictions: int = 0  # of those, used within the last `window` tokens
    filled: int = 0  # load_active's coalescing count: experts are never read along, so always 0

    def reset(self):
        self.__init__()

    def snapshot(self) -> "ExpertCacheStats":
        return replace(self)


class ExpertCache:
    """Slot bookkeeping of one MoE layer: `experts` routed experts, `slots` of them in DRAM.

    buffer: the layer's NeuronBuffer (rows = slots); None keeps only the bookkeeping (simulations).
    """

    def __init__(self, experts: int, slots: int, window: int = 5, buffer=None):
        assert 0 < slots <= experts and window > 0
        assert buffer is None or buffer.slots >= slots
        self.experts, self.slots, self.window, self.buffer = experts, slots, window, buffer
        self.slot_of = np.full(experts, -1, dtype=np.int32)  # expert -> slot, -1 when not cached
        self.expert_in = np.full(slots, -1, dtype=np.int32)  # slot -> expert, -1 when free
        self.last_used = np.full(experts, NEVER, dtype=np.int64)  # the token that last used each expert
        self.tokens = 0  # tokens seen
        self._pending: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self.stats = ExpertCacheStats()

    @property
    def n(self) -> int:
        """Slots holding an expert."""
        return int(np.count_nonzero(self.expert_in >= 0))

    def step(self, active: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """This step's experts -> (the experts to read, sorted ascending, and the slot each goes to); the
        caller reads them and commit()s. active: (tokens, top_k) expert ids, a group of tokens whose
        experts fit the slots, or a 1-d set for one token."""
        assert self._pending is None, "commit() or abort() the previous step first"
        active = np.asarray(active, dtype=np.int64)
        tokens = active.shape[0] if active.ndim == 2 else 1
        ids = np.unique(active)
        if ids.size and (ids[0] < 0 or ids[-1] >= self.experts):
            raise IndexError(f"expert ids out of range [0, {self.experts})")
        assert len(ids) <= self.slots, "a step's experts must fit the slots (flash.experts groups the tokens)"
        self.tokens += tokens
        self.last_used[ids] = self.tokens  # used now: none of them is evicted for another
        new = ids[self.slot_of[ids] < 0]
        free = np.flatnonzero(self.expert_in < 0)[: len(new)]
        short = len(new) - len(free)
        if short > 0:  # evict the least recently used of the experts this step does not need
            held = np.flatnonzero(self.expert_in >= 0)
            held = held[self.last_used[self.expert_in[held]] < self.tokens]
            victims = held[np.argsort(self.last_used[self.expert_in[held]], kind="stable")[:short]]
            gone = self.expert_in[victims]
            self.stats.window_evictions += int(np.count_nonzero(self.last_used[gone] > self.tokens - tokens
                                                                - self.window))
            self.stats.evicted += len(gone)
            self.slot_of[gone] = -1
            self.expert_in[victims] = -1
            free = np.sort(np.concatenate([free, victims]))
        self._pending = (new, free)
        self.stats.steps += 1
        self.stats.needed += len(ids)
        self.stats.hits += len(ids) - len(new)
        self.stats.misses += len(new)
        return new, free

    def commit(self):
        """The pending experts' bytes are in their slots: they join the cache."""
        new, slots = self._pending
        self._pending = None
        self.expert_in[slots] = new
        self.slot_of[new] = slots

    def abort(self):
        """The read failed: its slots stay free, its experts out (the next step asks for them again)."""
        self._pending = None

    def slots_of(self, experts: np.ndarray) -> np.ndarray:
        """Slot of each expert id (any shape), -1 when absent."""
        return self.slot_of[experts]

    def reset(self):
        """A new sequence: forget the recency (cached experts stay, and may hit)."""
        assert self._pending is None
        self.last_used[:] = NEVER
        self.tokens = 0
