"""Prompt mode for a mixture of experts: a prompt's experts read once per MoE layer, in expert order (the
expert counterpart of flash/prompt.py's PromptPass).

A prompt's tokens route to many experts at once. flash/experts.py runs a prompt as groups of consecutive
tokens whose experts fit the slots, each group a window step; with few slots an expert that several
groups need is evicted in between and read again for each. The pass reads the prompt's union of experts
once instead. Per MoE layer and prompt:

- the experts already in a slot compute their (token, k) pairs there, first;
- the others are read in ascending order (neighbouring extents on disk: large sequential direct reads),
  slice by slice into the two halves of the pass's staging area (two buffers of `rows` experts laid out
  as the slots are, allocated once, counted by the plan as `prompt_staging`), slice i+1 read while slice
  i computes: the pairs routed to a slice's experts are computed as it passes, by mlx-lm's SwitchGLU on
  the half (gather_qmm, no copy), or in numpy on MLX's CPU backend (flash.expert_numpy: each expert
  dequantized once, for all its pairs);
- the slots are refilled with the experts of the prompt's last tokens (as many tokens as fit), copied
  from the halves as they pass, so that decoding starts warm.

Each pair is computed once, on its expert's weights, and put back in its place: the output is the dense
MoE's. `choose` decides per layer and prompt from the predicted reads: the groups' (the slot cache's own
bookkeeping, simulated) against the pass's (the union less what the slots hold).
"""

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .bundle_reader import ReadStats
from .expert_cache import ExpertCache
from .expert_numpy import NumpySwitchGLU, expert_pairs, output_dtype
from .neuron_cache import NeuronBuffer

MODES = ("auto", "pass", "window")  # auto: per layer and prompt, from the predicted reads


def group_reads(cache: ExpertCache, ids: np.ndarray, groups) -> int:
    """Experts the groups would read: the cache's bookkeeping replayed on a copy (nothing is read)."""
    sim = ExpertCache(cache.experts, cache.slots, cache.window)
    sim.slot_of[:], sim.expert_in[:], sim.last_used[:] = cache.slot_of, cache.expert_in, cache.last_used
    sim.tokens, total = cache.tokens, 0
    for a, b in groups:
        new, _ = sim.step(ids[a:b])
        sim.commit()
        total += len(new)
    return total


def pass_reads(cache: ExpertCache, ids: np.ndarray) -> int:
    """Experts the pass would read: the prompt's union less those in a slot."""
    union = np.unique(ids)
    return int(np.count_nonzero(cache.slot_of[union] < 0))


def choose(mode: str, cache: ExpertCache, ids: np.ndarray, groups) -> bool:
    """Whether this layer runs this prompt as one pass (True) or as groups."""
    if mode != "auto":
        return mode == "pass"
    if len(groups) == 1:  # one group reads the same union, with less compute
        return False
    return pass_reads(cache, ids) < group_reads(cache, ids, groups)


def warm_start(ids: np.ndarray, slots: int) -> int:
    """The first of the prompt's last tokens whose experts fit the slots together (at least the last one)."""
    seen = np.zeros(int(ids.max()) + 1, dtype=bool)
    for t in range(len(ids) - 1, -1, -1):
        grown = seen.copy()
        grown[ids[t]] = True
        if np.count_nonzero(grown) > slots:
            return t + 1
        seen = grown
    return 0


@dataclass
class ExpertPassStats:
    read: ReadStats
    io_s: float  # the slices' reads
    io_exposed_s: float  # waits for a slice not read yet
    memory_s: float  # the slots' refill: bookkeeping and copies from the halves
    compute_s: float  # the pairs, slice by slice (evaluated as they pass)


def buffer_glu(glu, buffer: NeuronBuffer):
    """A shallow copy of mlx-lm's SwitchGLU `glu` (its activation, quantization) computing on `buffer`'s rows."""
    arrays = buffer.arrays(buffer.slots)
    mx.eval(arrays)
    out = copy.copy(glu)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        lin = copy.copy(getattr(glu, proj))
        for part in ("weight", "scales", "biases", "bias"):
            if f"{proj}.{part}" in arrays:
                lin[part] = arrays[f"{proj}.{part}"]
        setattr(out, proj, lin)
    out.freeze()
    return out


class ExpertPass:
    """One pass of a prompt over a MoE layer's experts, through two halves of `rows` experts each, shared by
    the layers (they run one after another). glu: any layer's SwitchGLU (all have one structure); staging:
    the model's shared staging area, the reads' scratch for the fields that do not land in place."""

    def __init__(self, glu, layout, rows: int, reader, staging):
        self.rows, self.reader, self.staging = rows, reader, staging
        self.halves = [NeuronBuffer(rows, layout, staging.np.reshape(-1)) for _ in range(2)]
        self.glus = [buffer_glu(glu, h) for h in self.halves]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="expert-pass")  # fans out to the reader's threads

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.halves)

    def _read(self, layer: int, experts: np.ndarray, half: NeuronBuffer) -> ReadStats:
        scratch = self.staging.np.reshape(-1)[: len(experts) * half.scratch_bytes].reshape(len(experts), -1)
        if half.segments is not None:  # aligned fields land in place, the rest through the scratch
            return self.reader.read_into(layer, experts, np.arange(len(experts)), half, scratch)
        read = self.reader.read(layer, experts, self.staging)
        half.fill(slice(0, len(experts)), self.staging.np[: len(experts)])
        return read

    def run(self, layer: int, xs: mx.array, ids: np.ndarray, cache: ExpertCache, slot_glu):
        """The routed experts' outputs for xs (N, d_model) routed to ids (N, k): (N, k, d_model), and the
        pass's costs; `cache`'s slots (computed on by `slot_glu`) end holding the last tokens' experts."""
        n, k = ids.shape
        flat, tok = ids.reshape(-1), np.repeat(np.arange(n), k)  # pair p = token p // k, its (p % k)-th expert
        union = np.unique(flat)
        streamed = union[cache.slot_of[union] < 0]
        read = ReadStats(direct=self.reader.direct)
        io = exposed = memory = compute = 0.0
        parts, order = [], []

        numpy = isinstance(slot_glu, NumpySwitchGLU)  # within flash.prefill's numpy_linears
        if numpy:
            x_np, out = np.asarray(xs.astype(mx.float32)), np.empty((n * k, xs.shape[-1]), dtype=np.float32)

        def pairs(glu, p: np.ndarray, where: np.ndarray):
            if numpy:  # done when it returns: the half may be refilled
                out[p] = expert_pairs(glu, x_np, tok[p], where[flat[p]])
                return
            y = glu(xs[mx.array(tok[p])], mx.array(where[flat[p]][:, None].astype(np.uint32)))  # (m, 1, d)
            mx.eval(y)  # before its weights' memory is refilled
            parts.append(y[:, 0])
            order.append(p)

        t0 = time.perf_counter()
        held = np.flatnonzero(cache.slot_of[flat] >= 0)
        if len(held):  # first, while they are in their slots
            pairs(slot_glu.glu if numpy else slot_glu, held, cache.slot_of)
        t1 = time.perf_counter()
        compute += t1 - t0
        start = warm_start(ids, cache.slots)
        cache.tokens += start  # recency counts every prompt token
        new, dest = cache.step(ids[start:])  # the last tokens' experts: their slots, filled as they pass
        memory += time.perf_counter() - t1
        slices = [streamed[i : i + self.rows] for i in range(0, len(streamed), self.rows)]
        fetch = lambda i: self._pool.submit(self._read, layer, slices[i], self.halves[i % 2])
        local = np.full(cache.experts, -1, dtype=np.int64)
        try:
            pending = fetch(0) if slices else None
            for i, sl in enumerate(slices):
                t2 = time.perf_counter()
                r = pending.result()
                exposed += time.perf_counter() - t2
                read.add(r)
                io += r.seconds
                if i + 1 < len(slices):
                    pending = fetch(i + 1)  # into the other half, while this one computes
                t3 = time.perf_counter()
                local[sl] = np.arange(len(sl))
                pairs(self.glus[i % 2], np.flatnonzero(np.isin(flat, sl)), local)
                t4 = time.perf_counter()
                compute += t4 - t3
                here = np.isin(new, sl)
                if here.any():
                    cache.buffer.take(dest[here], self.halves[i % 2], local[new[here]])
                memory += time.perf_counter() - t4
        except BaseException:
            cache.abort()  # nothing half-copied enters the slots
            raise
        cache.commit()
        if numpy:
            y = mx.array(out).astype(output_dtype(slot_glu.glu, xs.dtype))
        else:
            order = np.concatenate(order)
            y = mx.concatenate(parts, axis=0)[mx.array(np.argsort(order))]  # the pairs back in their places
        return y.reshape(n, k, -1), ExpertPassStats(read, io, exposed, memory, compute)

    def close(self):
        self._pool.shutdown(wait=True)
