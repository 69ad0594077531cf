"""The sliding window of neurons kept in DRAM (paper Sections 3.1 "windowing", 3.3).

Per layer, the neurons active for any of the last k tokens stay in memory; per
token only the ones new to the window are read from flash and the ones that left
it are dropped. The paper's memory management, which this class implements:

- one preallocated matrix of `slots` rows per layer (a BundleBuffer), never
  reallocated; rows [0, n) are exactly the cached neurons, with no holes, so the
  FFN computes on rows [0, n) directly (no gather);
- delete: copy the last occupied rows into the freed slots (n shrinks);
- insert: append the new neurons at rows [n, n + m), read there by the caller.

The cache does no I/O itself. One token of one layer goes:

    new, start = cache.step(active)           # evicts, reserves rows [start, start + m)
    try:
        reader.read(layer, new, buf, start_row=start)
    except BaseException:
        cache.abort()                         # nothing half-read enters the cache
        raise
    cache.commit()                            # rows [0, cache.n) now hold these neurons

which `load_active` does. A neuron enters the maps only at commit(), after its
bytes have arrived, so a failed read never leaves garbage weights behind a valid id.
MLX is lazy: evaluate the layer's output before the next step() moves its rows.
"""

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
    rows_moved: int = 0  # rows copied to fill holes (the paper's memory-management cost)
    bytes_moved: int = 0
    last_new: int = 0  # neurons appended by the latest step
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

    def __init__(self, d_ff: int, slots: int, window: int = 5, rows: Optional[np.ndarray] = None):
        assert slots > 0 and window > 0
        assert rows is None or len(rows) >= slots
        self.d_ff, self.slots, self.window = d_ff, slots, window
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


def load_active(cache: NeuronCache, reader, layer: int, dest, active: np.ndarray) -> int:
    """One token of one layer: window step, read the new bundles, commit. Returns n."""
    new, start = cache.step(active)
    try:
        reader.read(layer, new, dest, start_row=start, coalesce_gap=0)
    except BaseException:
        cache.abort()
        raise
    cache.commit()
    return cache.n
