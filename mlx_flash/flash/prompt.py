"""Prompt mode (beyond the paper, which optimises decode only): a prompt's FFN over every bundle of
the layer, read once in large sequential slices.

A prompt's tokens predict many different neurons: run as window steps (groups of consecutive
tokens whose predicted union fits the window, flash.ffn), a ReLU model reads ~2.4% of the FFN
new per token, so a 512-token prompt reads the FFN ~12 times over in bundle-sized random reads.
Reading each layer's bundles once, in order, costs one pass, and computing every neuron for
all the prompt's tokens makes the prompt exactly dense. Per layer:

- the staging area's two halves take turns: slice i+1 is read (direct, parallel, large
  sequential reads) while slice i computes; the layer's output is the sum over slices of the
  FFN on their rows (plus the down bias once);
- the window is refilled with the neurons predicted for the prompt's last `window` tokens,
  copied from the slices as they pass (no second read), so decoding starts warm;
- on MLX's CPU backend the slices multiply in numpy, dequantized a block of rows at a time
  (flash.prefill says why).

`choose` decides per layer and prompt from the predicted bytes: window steps' new neurons
against one pass over the layer.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..format import field_arrays
from ..models.ffn import BundleFFN, bundle_ffn
from .bundle_reader import ReadStats
from .prefill import use_numpy
from .sparsity import ffn_numpy

MODES = ("auto", "pass", "window")  # auto: per prompt from the predicted bytes


def window_step_reads(pred: np.ndarray, groups, cached: np.ndarray) -> int:
    """Neurons window steps would read for a prompt: each group's union less what the window holds
    when it starts (the previous group's union; before the first, the cache's neurons)."""
    held, total = cached, 0
    for a, b in groups:
        union = pred[a:b].any(axis=0)
        total += int(np.count_nonzero(union & ~held))
        held = union
    return total


def choose(mode: str, pred: np.ndarray, groups, cached: np.ndarray, d_ff: int) -> bool:
    """Whether this prompt runs as one pass over the layer (True) or as window steps."""
    if mode != "auto":
        return mode == "pass"
    return window_step_reads(pred, groups, cached) > d_ff


@dataclass
class PassStats:
    read: ReadStats
    io_s: float  # the slices' reads
    io_exposed_s: float  # waits for a slice that was not read yet
    memory_s: float  # the window's refill: bookkeeping and copies from the slices
    compute_s: float  # the FFN on the slices (evaluated slice by slice)
    warm: int  # neurons the window holds afterwards


class PromptPass:
    """One pass of a prompt over a layer's bundles, through the halves of the shared staging area."""

    def __init__(self, reader, staging):
        self.reader, self.staging = reader, staging
        self.rows = max(1, staging.slots // 2)  # bundles per slice
        self.halves = [staging.np[: self.rows], staging.np[self.rows : 2 * self.rows]]
        if len(self.halves[1]) < self.rows:  # a one-row area: no double buffering
            self.halves = [self.halves[0]]
        self.mx_halves = [staging.mx[: self.rows], staging.mx[self.rows : 2 * self.rows]]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prompt-read")  # fans out to the reader's

    def run(self, layer: int, xs: mx.array, spec, quant, down_bias, cache, warm: np.ndarray):
        """The FFN of xs (N, d_model) over every neuron of `layer`; the window of `cache` refilled with
        `warm` (best first). Returns (output (N, d_model), PassStats)."""
        d_ff, rows, nh = cache.d_ff, self.rows, len(self.halves)
        layout = self.staging.layout
        read, io, exposed, memory = ReadStats(direct=self.reader.direct), 0.0, 0.0, 0.0
        t0 = time.perf_counter()
        cache.reset()  # a prompt starts the window afresh: only its last tokens' neurons stay
        new, dest = cache.step(warm)
        memory += time.perf_counter() - t0
        starts = list(range(0, d_ff, rows))
        fetch = lambda i: self._pool.submit(self.reader.read, layer,
                                            np.arange(starts[i], min(starts[i] + rows, d_ff)), self.halves[i % nh])
        y, compute = None, 0.0
        numpy = use_numpy(xs.shape[0])  # on MLX's CPU backend the slices multiply in numpy (flash.prefill)
        if numpy:
            xn = np.asarray(xs.astype(mx.float32))  # (N, d_model)
            yn = np.zeros_like(xn)
        try:
            pending = fetch(0)
            for i, lo in enumerate(starts):
                hi = min(lo + rows, d_ff)
                t1 = time.perf_counter()
                r = pending.result()
                exposed += time.perf_counter() - t1
                read.add(r)
                io += r.seconds
                if i + 1 < len(starts) and nh > 1:
                    pending = fetch(i + 1)  # into the other half, while this one computes
                t2 = time.perf_counter()
                fields = field_arrays(self.mx_halves[i % nh][: hi - lo], layout)
                if numpy:
                    if y is None:  # the dtype MLX's FFN would return
                        y = bundle_ffn(xs[:1], spec, fields, None, quant)
                    yn += ffn_numpy(BundleFFN(spec, fields, None, quant), xn, None, len(xn), down_bias=False)
                else:
                    part = bundle_ffn(xs, spec, fields, None, quant)
                    y = part if y is None else y + part
                    mx.eval(y)  # this half is read into next: what was built on it must be done
                t3 = time.perf_counter()
                compute += t3 - t2
                here = (new >= lo) & (new < hi)
                if here.any():
                    cache.buffer.fill(dest[here], self.halves[i % nh][new[here] - lo])
                memory += time.perf_counter() - t3
                if i + 1 < len(starts) and nh == 1:
                    pending = fetch(i + 1)
        except BaseException:
            cache.abort()  # nothing half-copied enters the window
            raise
        cache.commit()
        if numpy:
            y = mx.array(yn).astype(y.dtype)
        if down_bias is not None:
            y = y + down_bias
        return y, PassStats(read, io, exposed, memory, compute, cache.n)

    def close(self):
        self._pool.shutdown(wait=True)
