"""The sliding window of neurons kept in DRAM (paper Sections 3.1 "windowing", 3.3).

Per layer, the neurons active for any of the last k tokens stay in memory; per
token only the ones new to the window are read from flash and the ones that left
it are dropped. The paper's memory management, which this class implements:

- one preallocated matrix of `slots` rows per layer (a BundleBuffer), never
  reallocated; rows [0, n) are exactly the cached neurons, with no holes, so the
  FFN computes on rows [0, n) directly (no gather);
- delete: copy the last occupied rows into the freed slots (n shrinks);
- insert: append the new neurons at rows [n, n + m), read there by the caller.

The cache does no I/O itself. One token of one layer goes through `load_active`,
the one place the window protocol is written (the runtime and the benchmark use it):

    new, start = cache.step(active)           # evicts, reserves rows [start, start + m)
    try:
        reader.read(layer, new, buf, start_row=start)
    except BaseException:
        cache.abort()                         # nothing half-read enters the cache
        raise
    cache.commit()                            # rows [0, cache.n) now hold these neurons

A neuron enters the maps only at commit(), after its bytes have arrived, so a failed
read never leaves garbage weights behind a valid id. MLX is lazy: evaluate the
layer's output before the next step() moves its rows.

Coalescing (`coalesce_gap` > 0): new neurons at most that many apart are read as one
run, the absent neurons between them coming along (computed on, and kept only if a
later token predicts them); longer reads pay off where the disk favours them.
"""

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np


@dataclass
class CacheStats:
    steps: int = 0  # tokens seen
    window_shrinks: int = 0  # steps where the union did not fit and old tokens were dropped
    tokens_dropped: int = 0  # tokens those shrinks dropped
    truncations: int = 0  # steps whose own active set exceeded the slots
    new_neurons: int = 0  # neurons appended (to be read from flash), all steps
    evicted: int = 0  # neurons deleted, all steps
    filled: int = 0  # absent neurons read along by coalescing, all steps
    rows_moved: int = 0  # rows copied to fill holes (the paper's memory-management cost)
    bytes_moved: int = 0
    last_new: int = 0  # neurons appended by the latest step (fillers included)
    occupancy: float = 0.0  # n / slots after the latest commit

    def reset(self):
        self.__init__()

    def snapshot(self) -> "CacheStats":
        return replace(self)


class NeuronCache:
    """Which neuron lives in which row of one layer's buffer, and the window of tokens.

    rows: the (slots, row_bytes) numpy view of the layer's buffer (BundleBuffer.np);
    rows move with their neurons. None keeps only the bookkeeping (simulations).
    """

    def __init__(self, d_ff: int, slots: int, window: int = 5, rows: Optional[np.ndarray] = None,
                 coalesce_gap: int = 0):
        assert slots > 0 and window > 0 and coalesce_gap >= 0
        assert rows is None or len(rows) >= slots
        self.d_ff, self.slots, self.window, self.coalesce_gap = d_ff, slots, window, coalesce_gap
        self.rows = rows
        # rows move as 8-byte words: numpy's fancy-index copy is ~4x faster than byte by byte
        self._words = rows.view(np.uint64) if rows is not None and rows.shape[1] % 8 == 0 \
            and rows.flags.c_contiguous else rows
        self._address = None if rows is None else rows.ctypes.data
        self.slot_to_neuron = np.full(slots, -1, dtype=np.int32)
        self.neuron_to_slot = np.full(d_ff, -1, dtype=np.int32)
        self.n = 0  # rows [0, n) occupied
        self._tokens = deque()  # sorted unique active sets, oldest first
        self._count = np.zeros(d_ff, dtype=np.int32)  # how many window tokens hold each neuron
        self._union = 0  # count_nonzero(self._count)
        self._pending: Optional[Tuple[np.ndarray, int]] = None
        self.stats = CacheStats()

    # -- the window

    @property
    def window_tokens(self) -> int:
        return len(self._tokens)

    def window_union(self) -> np.ndarray:
        """The neurons that must be resident (sorted)."""
        return np.flatnonzero(self._count)

    def _push(self, ids: np.ndarray):
        self._union += int(np.count_nonzero(self._count[ids] == 0))
        self._count[ids] += 1
        self._tokens.append(ids)

    def _pop(self):
        ids = self._tokens.popleft()
        self._count[ids] -= 1
        self._union -= int(np.count_nonzero(self._count[ids] == 0))

    def reset(self):
        """Forget the window (a new sequence); cached rows stay until the next step drops them."""
        assert self._pending is None
        self._tokens.clear()
        self._count[:] = 0
        self._union = 0

    # -- per token

    def step(self, active: np.ndarray) -> Tuple[np.ndarray, int]:
        """Slide the window to this token; return (new neurons sorted ascending, first row).

        active: this token's predicted neurons, best first (used only if they exceed
        the slots: then the first `slots` are kept). The caller reads the returned
        neurons into rows [start, start + len(new)) and calls commit().
        """
        assert self._pending is None, "commit() or abort() the previous step first"
        active = np.asarray(active, dtype=np.int64).ravel()
        if active.size and (active.min() < 0 or active.max() >= self.d_ff):
            raise IndexError(f"neuron ids out of range [0, {self.d_ff})")
        ids = np.unique(active)
        if len(ids) > self.slots:  # best `slots` distinct ids in the given order
            _, first = np.unique(active, return_index=True)
            ids = np.sort(active[np.sort(first)][: self.slots])
            self.stats.truncations += 1
        self._push(ids)
        while len(self._tokens) > self.window:
            self._pop()
        if self._union > self.slots:  # the paper's fallback: shrink the window, oldest first
            self.stats.window_shrinks += 1
            while self._union > self.slots:
                self._pop()
                self.stats.tokens_dropped += 1
        self._evict()
        new = np.flatnonzero((self._count > 0) & (self.neuron_to_slot < 0))
        if self.coalesce_gap and len(new) > 1:
            full = fill_gaps(new, self.coalesce_gap, self.neuron_to_slot >= 0, self.slots - self.n - len(new))
            self.stats.filled += len(full) - len(new)
            new = full
        assert self.n + len(new) <= self.slots
        self._pending = (new, self.n)
        self.stats.steps += 1
        self.stats.last_new = len(new)
        return new, self.n

    def commit(self):
        """The pending neurons' bytes are in rows [n, n + m): they join the cache."""
        new, start = self._pending
        end = start + len(new)
        self.slot_to_neuron[start:end] = new
        self.neuron_to_slot[new] = np.arange(start, end, dtype=np.int32)
        self.n = end
        self._pending = None
        self.stats.new_neurons += len(new)
        self.stats.occupancy = self.n / self.slots

    def abort(self):
        """The read failed: the pending neurons stay out (the next step asks for them again)."""
        self._pending = None

    def _evict(self):
        """Drop cached neurons outside the window; the last rows fill the holes."""
        n = self.n
        cached = self.slot_to_neuron[:n]  # (n,)
        gone = self._count[cached] == 0  # (n,) rows to free
        n_gone = int(np.count_nonzero(gone))
        if n_gone == 0:
            return
        self.neuron_to_slot[cached[gone]] = -1
        n2 = n - n_gone
        holes = np.flatnonzero(gone[:n2])  # freed rows below the new end
        movers = n2 + np.flatnonzero(~gone[n2:])  # kept rows above it; as many as holes
        if len(holes):
            if self.rows is not None:
                self._words[holes] = self._words[movers]  # (h, row) copy, no reallocation
                self.stats.bytes_moved += len(holes) * self.rows.shape[1]
            moved = self.slot_to_neuron[movers]
            self.slot_to_neuron[holes] = moved
            self.neuron_to_slot[moved] = holes
            self.stats.rows_moved += len(holes)
        self.slot_to_neuron[n2:n] = -1
        self.n = n2
        self.stats.evicted += n_gone
        assert self.rows is None or self.rows.ctypes.data == self._address, "buffer was reallocated"

    # -- lookups

    @property
    def resident(self) -> np.ndarray:
        """Neuron id of each occupied row: (n,) int32, row order."""
        return self.slot_to_neuron[: self.n]

    def rows_of(self, neurons: np.ndarray) -> np.ndarray:
        """Row of each neuron, -1 when absent."""
        return self.neuron_to_slot[np.asarray(neurons)]


def fill_gaps(new: np.ndarray, gap: int, cached: np.ndarray, spare: int) -> np.ndarray:
    """`new` (sorted) plus the absent neurons of every gap of <= gap neurons none of which is cached
    (a cached one would be read twice), left to right while `spare` rows remain."""
    missing = np.diff(new) - 1  # (m-1,) neurons between consecutive new ones
    cs = np.concatenate([[0], np.cumsum(cached, dtype=np.int64)])  # cs[i]: cached among [0, i)
    cached_between = cs[new[1:]] - cs[new[:-1] + 1]
    fill = (missing > 0) & (missing <= gap) & (cached_between == 0)
    fill &= np.cumsum(np.where(fill, missing, 0)) <= max(spare, 0)
    reps = np.append(np.where(fill, missing, 0), 0) + 1  # (m,) neurons each new one heads
    first = np.repeat(np.cumsum(reps) - reps, reps)
    return np.repeat(new, reps) + (np.arange(reps.sum()) - first)


@dataclass
class Loaded:
    """One window step of one layer: what it cost and what it read."""

    n: int  # rows [0, n) hold the window's neurons
    new: int  # bundles read (fillers included)
    filled: int  # of those, read only because coalescing joined two runs
    memory_s: float  # window bookkeeping, row moves, commit
    io_s: float  # the read


def load_active(cache: NeuronCache, reader, layer: int, dest, active: np.ndarray) -> Loaded:
    """The window protocol: slide the window to this token's active neurons, read the new bundles
    into their rows, commit; nothing half-read enters the cache."""
    filled0 = cache.stats.filled
    t0 = time.perf_counter()
    new, start = cache.step(active)
    t1 = time.perf_counter()
    try:
        reader.read(layer, new, dest, start_row=start)
    except BaseException:
        cache.abort()
        raise
    t2 = time.perf_counter()
    cache.commit()
    t3 = time.perf_counter()
    return Loaded(cache.n, len(new), cache.stats.filled - filled0, (t1 - t0) + (t3 - t2), t2 - t1)
