"""The sliding window of neurons kept in DRAM (paper Sections 3.1 "windowing", 3.3).

Per layer, the neurons active for any of the last k tokens stay in memory; per
token only the ones new to the window are read from flash and the ones that left
it are dropped. The paper's memory management, which this module implements:

- one preallocated buffer per layer (`NeuronBuffer`), never reallocated: per bundle
  field (gate, up, down rows, their quantization scales and biases, biases) one
  packed (slots, bytes) array; rows [0, n) are exactly the cached neurons, with no
  holes, so the FFN computes on rows [0, n) of packed arrays directly (no gather,
  and no copy: MLX's matmuls take a row slice of a packed array as it is);
- insert: new neurons take the rows freed by the ones that left, then rows past the
  end; their bundles are read whole (direct I/O wants whole aligned blocks) into a
  small staging area, and only their fields are copied into the rows, so per token
  the copies are proportional to what is new, not to the window;
- delete: when fewer neurons arrive than left, the last occupied rows move into the
  holes that remain (n shrinks): the paper's delete, with the fewest moves (in steady
  state arrivals fill the holes and nothing moves).

`NeuronCache` does the bookkeeping and no I/O; `load_active` is the one place the
window protocol is written (the runtime and the benchmark use it):

    new, rows = cache.step(active)            # evicts, reserves a row per new neuron (moves rows if needed)
    try:
        reader.read(layer, new, staging)      # in chunks of the staging area's rows
        buffer.fill(rows, staging rows)
    except BaseException:
        cache.abort()                         # nothing half-read enters the cache
        raise
    cache.commit()                            # rows [0, cache.n) now hold these neurons

A neuron enters the maps only at commit(), after its bytes have arrived, so a failed
read never leaves garbage weights behind a valid id. MLX is lazy: the layer's output
must be evaluated before the next step() moves its rows (FlashFFN makes sure).

Coalescing (`coalesce_gap` > 0): new neurons at most that many apart are read as one
run, the absent neurons between them coming along (computed on, and kept only if a
later token predicts them); longer reads pay off where the disk favours them.
"""

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from ..format import BundleLayout, group_fields
from .bundle_reader import BUFFER_ALIGN, BundleBuffer, ReadStats


class NeuronBuffer:
    """One layer's neurons in DRAM: per bundle field, one packed (slots, bytes) MLX array, allocated once.

    Row r of every field array belongs to the same neuron. `fields(n)` are typed views of rows
    [0, n); `fill` copies staged bundles' fields into rows; `move` copies rows into holes through
    `scratch` (a preallocated flat uint8 array, shared), so that nothing is allocated per token.
    """

    def __init__(self, slots: int, layout: BundleLayout, scratch: np.ndarray):
        self.slots, self.layout, self.scratch = slots, layout, scratch
        self._owners, self._mx, self._np, self._mv = [], {}, {}, {}
        for f in layout.fields:
            size = slots * f.nbytes
            owner = mx.zeros((size + BUFFER_ALIGN,), dtype=mx.uint8)  # rows aligned for direct reads
            mx.eval(owner)
            whole = np.array(memoryview(owner), copy=False)
            off = -whole.ctypes.data % BUFFER_ALIGN
            self._owners.append(owner)
            self._mx[f.name] = owner[off : off + size].reshape(slots, f.nbytes)
            self._np[f.name] = whole[off : off + size].reshape(slots, f.nbytes)  # the same memory, writable
            self._mv[f.name] = memoryview(self._np[f.name].reshape(-1))
        mx.eval(list(self._mx.values()))
        self.row_bytes = sum(f.nbytes for f in layout.fields)
        self._addresses = [v.ctypes.data for v in self._np.values()]
        # (name, offset in a bundle, bytes, MLX dtype, shape) per field: the hot paths read these
        self._spec = [(f.name, f.offset, f.nbytes, getattr(mx, f.dtype), f.shape) for f in layout.fields]
        self._direct_layout(layout)

    def _direct_layout(self, layout: BundleLayout):
        """How a bundle's bytes split for reads straight into the field arrays (BundleReader.read_into):
        fields whose offset and size are multiples of the alignment land in place, every other byte
        range in a scratch row; `segments` is None when no field can land in place."""
        a = layout.alignment
        direct = sorted((f for f in layout.fields if f.offset % a == 0 and f.nbytes % a == 0), key=lambda f: f.offset)
        segments, pos = [], 0
        for f in direct:
            if f.offset > pos:
                segments.append((pos, f.offset - pos, None))
            segments.append((f.offset, f.nbytes, f.name))
            pos = f.offset + f.nbytes
        if pos < layout.stride:
            segments.append((pos, layout.stride - pos, None))
        self.segments = segments if direct else None
        self.scratch_bytes = sum(n for _, n, name in segments if name is None)
        col, columns = 0, []  # scratch column of each byte range that goes to scratch
        for off, n, name in segments:
            if name is None:
                columns.append((off, n, col))
                col += n
        where = lambda o: next(c + o - off for off, n, c in columns if off <= o < off + n)
        self._tail = [(f.name, where(f.offset), f.nbytes) for f in layout.fields if f not in direct]
        self._crc_col = where(layout.crc_offset)

    def pieces(self, row: int, scratch_row: np.ndarray) -> list:
        """The writable buffers a bundle's bytes go to, in file order, for row `row`."""
        out, col, tail = [], 0, memoryview(scratch_row)
        for _, n, name in self.segments:
            if name is None:
                out.append(tail[col : col + n])
                col += n
            else:
                out.append(self._mv[name][row * n : (row + 1) * n])
        return out

    def stored_crc(self, scratch_row: np.ndarray) -> int:
        return int.from_bytes(scratch_row[self._crc_col : self._crc_col + 4].tobytes(), "little")

    def finish(self, rows: np.ndarray, scratch: np.ndarray):
        """After read_into: copy the fields that landed in scratch rows into their field arrays."""
        for name, col, nbytes in self._tail:
            self._np[name][rows] = scratch[:, col : col + nbytes]

    @property
    def nbytes(self) -> int:
        return self.slots * self.row_bytes

    @property
    def addresses(self) -> list:
        """Where each field array lives: fixed for the buffer's life."""
        return [v.ctypes.data for v in self._np.values()]

    def rows(self, n: int) -> np.ndarray:
        """(n, row_bytes) copy of rows [0, n) as packed bundles without padding (tests, checks)."""
        return np.concatenate([self._np[f.name][:n] for f in self.layout.fields], axis=1)

    def arrays(self, n: int) -> dict:
        """Typed MLX views of rows [0, n) of every field, by field name, (n, *shape), without copies."""
        views = {}
        for name, _, _, dtype, shape in self._spec:
            v = self._mx[name][:n].view(dtype)  # (n, count), row-contiguous
            views[name] = v if len(shape) == 1 else v.reshape(n, *shape)
        return views

    def fields(self, n: int) -> dict:
        """Typed MLX views of rows [0, n) of every field (models.ffn.bundle_ffn's dict), without copies."""
        return group_fields(self.arrays(n))

    def fill(self, rows, staged: np.ndarray):
        """Copy the fields of staged whole bundles (m, stride) into rows[k] (ascending, or a slice)."""
        if not isinstance(rows, slice):
            if not len(rows):
                return
            if rows[-1] - rows[0] == len(rows) - 1:  # one run: a slice copy
                rows = slice(int(rows[0]), int(rows[-1]) + 1)
        for name, offset, nbytes, _, _ in self._spec:
            self._np[name][rows] = staged[:, offset : offset + nbytes]

    def take(self, rows: np.ndarray, other: "NeuronBuffer", other_rows: np.ndarray):
        """Copy rows other_rows[k] of `other` (a buffer of the same layout) into rows[k]."""
        for name, _, _, _, _ in self._spec:
            self._np[name][rows] = other._np[name][other_rows]

    def move(self, holes: np.ndarray, movers: np.ndarray) -> int:
        """Row movers[k] into row holes[k] (holes all below movers); returns the bytes moved."""
        for name, _, nbytes, _, _ in self._spec:
            a, per = self._np[name], max(1, len(self.scratch) // nbytes)
            for i in range(0, len(holes), per):  # rarely more than one round
                tmp = self.scratch[: min(per, len(holes) - i) * nbytes].reshape(-1, nbytes)
                np.take(a, movers[i : i + per], axis=0, out=tmp, mode="clip")  # "raise" would buffer `out`
                a[holes[i : i + per]] = tmp
        assert self.addresses == self._addresses, "buffer was reallocated"
        return len(holes) * self.row_bytes


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

    buffer: the layer's NeuronBuffer, whose rows move with their neurons; None keeps
    only the bookkeeping (simulations).
    """

    def __init__(self, d_ff: int, slots: int, window: int = 5, buffer: Optional[NeuronBuffer] = None,
                 coalesce_gap: int = 0):
        assert slots > 0 and window > 0 and coalesce_gap >= 0
        assert buffer is None or buffer.slots >= slots
        self.d_ff, self.slots, self.window, self.coalesce_gap = d_ff, slots, window, coalesce_gap
        self.buffer = buffer
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

    def step(self, active: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Slide the window to this token; return (new neurons sorted ascending, their rows, ascending).

        active: this token's predicted neurons, best first (used only if they exceed
        the slots: then the first `slots` are kept). The caller reads neuron new[k]'s
        bundle into row rows[k] and calls commit(); rows [0, n) are then the window.
        """
        assert self._pending is None, "commit() or abort() the previous step first"
        active = np.asarray(active, dtype=np.int64).ravel()
        if active.size and (active.min() < 0 or active.max() >= self.d_ff):
            raise IndexError(f"neuron ids out of range [0, {self.d_ff})")
        # flatnonzero's output is sorted and unique already; np.unique would cost ~0.5 ms per layer
        ids = active if np.all(active[1:] > active[:-1]) else np.unique(active)
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
        holes = self._evict()
        new = np.flatnonzero((self._count > 0) & (self.neuron_to_slot < 0))
        if self.coalesce_gap and len(new) > 1:
            spare = self.slots - (self.n - len(holes)) - len(new)
            full = fill_gaps(new, self.coalesce_gap, self.neuron_to_slot >= 0, spare)
            self.stats.filled += len(full) - len(new)
            new = full
        rows = self._place(len(new), holes)
        assert self.n <= self.slots
        self._pending = (new, rows)
        self.stats.steps += 1
        self.stats.last_new = len(new)
        return new, rows

    def commit(self):
        """The pending neurons' bytes are in their rows: they join the cache."""
        new, rows = self._pending
        self.slot_to_neuron[rows] = new
        self.neuron_to_slot[new] = rows
        self._pending = None
        self.stats.new_neurons += len(new)
        self.stats.occupancy = self.n / self.slots

    def abort(self):
        """The read failed: the pending neurons stay out (the next step asks for them again), and
        the rows reserved for them are closed like deletions."""
        _, rows = self._pending
        self._pending = None
        self._place(0, rows)

    def _evict(self) -> np.ndarray:
        """Forget the cached neurons outside the window; returns their rows (holes in [0, n), sorted)."""
        cached = self.slot_to_neuron[: self.n]  # (n,)
        holes = np.flatnonzero(self._count[cached] == 0)
        if len(holes):
            self.neuron_to_slot[cached[holes]] = -1
            self.slot_to_neuron[holes] = -1
            self.stats.evicted += len(holes)
        return holes

    def _place(self, m: int, holes: np.ndarray) -> np.ndarray:
        """Rows for m new neurons, given the holes in [0, n): the holes first, then rows past the end.
        When fewer arrive than left, the last rows move into the holes that remain (the paper's
        delete), the fewest moves that keep rows [0, n) without holes; n becomes the new count."""
        n, g = self.n, len(holes)
        if m >= g:  # steady state: new neurons take the freed rows, no row moves
            self.n = n + m - g
            return np.concatenate([holes, np.arange(n, self.n)])
        end = n - g + m
        low = holes[holes < end]  # to be filled: by the rows past `end` that are occupied, then by new ones
        movers = end + np.flatnonzero(self.slot_to_neuron[end:n] >= 0)
        k = len(movers)
        if k:
            dest = low[:k]
            if self.buffer is not None:
                self.stats.bytes_moved += self.buffer.move(dest, movers)
            moved = self.slot_to_neuron[movers]
            self.slot_to_neuron[dest] = moved
            self.neuron_to_slot[moved] = dest
            self.slot_to_neuron[movers] = -1
            self.stats.rows_moved += k
        self.n = end
        return low[k:]

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
    new: int  # neurons new to the window (fillers included)
    filled: int  # of those, read only because coalescing joined two runs
    read: ReadStats  # the reads made now, summed over the staging rounds
    memory_s: float  # window bookkeeping, row moves, copies from the staging areas, commit
    io_s: float  # the reads made now
    hits: int = 0  # new neurons whose bundles were prefetched (flash.prefetch)


def load_active(cache: NeuronCache, reader, layer: int, staging: BundleBuffer, active: np.ndarray,
                prefetched: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Loaded:
    """The window protocol: slide the window to this token's active neurons, read the new bundles
    (in rounds of the staging area's rows) and copy them into their rows, commit; nothing
    half-read enters the cache. prefetched: (sorted neurons, their bundles) read ahead, used
    for the new neurons among them instead of reading those."""
    filled0 = cache.stats.filled
    read, io, hits = ReadStats(direct=reader.direct), 0.0, 0
    t0 = time.perf_counter()
    new, rows = cache.step(active)
    buf = cache.buffer
    if prefetched is not None and len(prefetched[0]) and len(new):
        ahead, bundles = prefetched
        pos = np.minimum(np.searchsorted(ahead, new), len(ahead) - 1)
        hit = ahead[pos] == new
        hits = int(np.count_nonzero(hit))
        buf.fill(rows[hit], bundles[pos[hit]])
        new, rows = new[~hit], rows[~hit]
    try:
        for k in range(0, len(new), staging.slots):
            part, where = new[k : k + staging.slots], rows[k : k + staging.slots]
            t1 = time.perf_counter()
            if buf.segments is not None:  # aligned fields land in their rows: nothing to copy but the rest
                scratch = staging.np.reshape(-1)[: len(part) * buf.scratch_bytes].reshape(len(part), -1)
                read.add(reader.read_into(layer, part, where, buf, scratch))
                io += time.perf_counter() - t1
            else:
                read.add(reader.read(layer, part, staging))
                io += time.perf_counter() - t1
                buf.fill(where, staging.np[: len(part)])
    except BaseException:
        cache.abort()
        raise
    cache.commit()
    total = time.perf_counter() - t0
    return Loaded(cache.n, len(new) + hits, cache.stats.filled - filled0, read, total - io, io, hits)
