"""The flash FFN of one layer: predict, slide the window, read the new bundles, compute.

Per token (paper Sections 3.1-3.3):
  1. the low-rank predictor scores every neuron from the FFN input (the layer's one
     host sync in decode: its scores decide the reads);
  2. the layer's NeuronCache slides its window: new neurons take the rows of those that
     left, then rows past the end (the last rows move into holes only when fewer arrive);
  3. the BundleReader reads only those new bundles: straight into their rows of the
     layer's NeuronBuffer where the layout allows, else into the staging area, from which
     their fields are copied (what the layer before read ahead is copied from its area);
  4. the FFN computes on rows [0, n) of the packed field arrays: no gather, no copy,
     no reallocation. MLX evaluates it lazily, at the next layer's sync.
Computing on every neuron in the window (not only this token's predicted ones)
costs nothing extra to read and brings the output closer to dense.

A prompt (L > 1) is cut into groups of consecutive tokens whose predicted union
fits the buffer; each group is one window step. When those steps would read more
than the layer's whole FFN, the prompt runs as one pass over every bundle instead
(flash.prompt: exact, and the window refilled from its last tokens).
"""

import time
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.ffn import FFNSpec, bundle_ffn
from .neuron_cache import load_active
from .prompt import choose


def to_host(a: mx.array) -> np.ndarray:
    """A host sync: waits until MLX has computed `a` and all it depends on, then copies it out."""
    return np.array(a)


@dataclass
class FlashStats:
    """Time and bytes of the flash FFNs of a model, split by phase like the paper's Table 2/3.

    Decode steps (one token through the model) and prompt steps are kept apart;
    `snapshot()` reports per decode token. Compute is split into attention, prediction
    and FFN only when profiling (extra syncs); otherwise it is one figure, ms_compute.
    """

    n_layers: int = 0
    d_ff: int = 0
    decode_tokens: int = 0
    prompt_tokens: int = 0
    compute_s: float = 0.0  # without profiling: waits at the one sync per layer (all that MLX computes)
    attention_s: float = 0.0  # profiling: everything computed between two FFNs (attention, norms), decode only
    predict_s: float = 0.0  # profiling
    memory_s: float = 0.0  # window bookkeeping, row moves, staging copies (the paper's "memory management")
    io_s: float = 0.0
    ffn_s: float = 0.0  # profiling: FFN compute on the buffer rows
    io_exposed_s: float = 0.0  # the part of io_s the token waited for (all of it without prefetch)
    bytes_read: int = 0
    bytes_requested: int = 0
    bundles: int = 0  # bundles read
    syscalls: int = 0
    predicted: int = 0  # neurons predicted active, summed over layers and tokens
    resident: int = 0  # neurons held in the windows, summed over layers and tokens
    bytes_moved: int = 0
    window_shrinks: int = 0
    truncations: int = 0
    prompt_io_s: float = 0.0
    prompt_bytes_read: int = 0
    prompt_passes: int = 0  # layer calls whose prompt ran as one pass over every bundle (flash.prompt)
    prompt_window_steps: int = 0  # window steps of prompts run as window steps
    prompt_io_exposed_s: float = 0.0  # passes: waits for a slice not read yet
    prompt_memory_s: float = 0.0  # passes: the windows' refill; window steps: their memory management
    prompt_compute_s: float = 0.0  # passes: the FFN on the slices (window steps compute lazily: not in here)
    needed: int = 0  # neurons new to a window in decode (they had to come from disk, now or ahead)
    prefetched: int = 0  # bundles read ahead by the lookahead (flash.prefetch), decode
    prefetch_hits: int = 0  # of those, needed by their layer
    prefetch_wasted: int = 0  # of those, not needed: dropped

    def add_read(self, last, requested: int, decode: bool):
        """Count one read call (a ReadStats); `requested`: bytes the caller needed, fillers excluded."""
        if decode:
            self.bytes_read += last.bytes_read
            self.bytes_requested += requested
            self.bundles += last.bundles
            self.syscalls += last.syscalls
        else:
            self.prompt_io_s += last.seconds
            self.prompt_bytes_read += last.bytes_read

    def reset(self):
        for f in fields(self):
            if f.name not in ("n_layers", "d_ff"):
                setattr(self, f.name, f.default)

    def snapshot(self) -> dict:
        t = max(self.decode_tokens, 1)
        per_layer_token = max(self.decode_tokens * self.n_layers * self.d_ff, 1)
        ms = lambda s: 1000.0 * s / t
        return {
            "decode_tokens": self.decode_tokens,
            "prompt_tokens": self.prompt_tokens,
            "ms_compute": ms(self.compute_s + self.attention_s + self.predict_s + self.ffn_s),
            "ms_attention": ms(self.attention_s),
            "ms_predict": ms(self.predict_s),
            "ms_memory": ms(self.memory_s),
            "ms_io": ms(self.io_s),
            "ms_io_exposed": ms(self.io_exposed_s),
            "ms_ffn": ms(self.ffn_s),
            "bytes_read_per_token": self.bytes_read / t,
            "bytes_requested_per_token": self.bytes_requested / t,
            "bundles_per_token": self.bundles / t,
            "syscalls_per_token": self.syscalls / t,
            "read_gb_per_s": self.bytes_read / self.io_s / 1e9 if self.io_s else 0.0,
            "ffn_share_read": self.bundles / per_layer_token,
            "ffn_share_predicted": self.predicted / per_layer_token,
            "ffn_share_resident": self.resident / per_layer_token,
            "bytes_moved_per_token": self.bytes_moved / t,
            "window_shrinks": self.window_shrinks,
            "truncations": self.truncations,
            "prompt_bytes_read": self.prompt_bytes_read,
            "prompt_ms_io": 1000.0 * self.prompt_io_s,
            "prompt_ms_io_exposed": 1000.0 * self.prompt_io_exposed_s,
            "prompt_ms_memory": 1000.0 * self.prompt_memory_s,
            "prompt_ms_ffn": 1000.0 * self.prompt_compute_s,
            "prompt_passes": self.prompt_passes,
            "prompt_window_steps": self.prompt_window_steps,
            "prompt_mode": ("pass" if self.prompt_passes and not self.prompt_window_steps else
                            "window steps" if self.prompt_window_steps and not self.prompt_passes else
                            "mixed" if self.prompt_passes else None),
            "prefetched_per_token": self.prefetched / t,  # bundles; x stride for bytes
            "prefetch_hit_rate": self.prefetch_hits / self.needed if self.prefetched and self.needed else None,
            "prefetch_precision": self.prefetch_hits / self.prefetched if self.prefetched else None,
            "prefetch_wasted_per_token": self.prefetch_wasted / t,
        }


class FlashFFN(nn.Module):
    """One layer's FFN in flash mode. `buffer` is its NeuronBuffer (driven by `cache`), `staging`
    the model's shared staging area for reads. profile: add host syncs so that attention,
    prediction and FFN compute are timed apart (the benchmark); off, a decode step syncs once
    per layer, on the predictor's scores, which decide the reads."""

    def __init__(self, layer: int, spec: FFNSpec, quant, predictor, tau: float, buffer, cache, reader, staging,
                 down_bias, stats: FlashStats, profile: bool = False):
        super().__init__()
        self.layer, self.spec, self.quant = layer, spec, quant
        self.predictor = predictor  # callable: (N, d_model) -> (N, d_ff) scores; active iff score > tau
        self.tau = tau
        self.buffer, self.cache, self.reader, self.staging = buffer, cache, reader, staging
        self.down_bias = down_bias
        self.stats, self.profile = stats, profile
        self._last = None  # the latest output, built on this layer's rows
        # lookahead prefetch (flash.prefetch), set by attach_flash: the next layer's predictor on this
        # layer's input, its threshold, the next layer's FlashFFN, the shared Prefetcher
        self.lookahead, self.look_tau, self.next, self.prefetcher = None, 0.0, None, None
        self.pinned = None  # flash.outliers.PinnedNeurons, set by attach_flash: computed every token
        # prompts: flash.prompt's PromptPass (shared by the layers) and its mode, set by attach_flash
        self.prompt, self.prompt_mode = None, "window"
        self.freeze()

    def prefetch(self, neurons: np.ndarray):
        """Layer l-1's lookahead predicted these of this layer's neurons: read the bundles of those
        not in the window in the background."""
        if self.pinned is not None:
            neurons = np.setdiff1d(neurons, self.pinned.neurons, assume_unique=True)
        absent = neurons[self.cache.neuron_to_slot[neurons] < 0]
        n = self.prefetcher.start(self.layer, absent)
        self.stats.prefetched += n

    def groups(self, pred: np.ndarray):
        """Cut N tokens into runs whose predicted union fits the buffer (a prompt); N == 1 is one run."""
        start, union = 0, np.zeros(pred.shape[1], dtype=bool)
        for t in range(len(pred)):
            grown = union | pred[t]
            if t > start and np.count_nonzero(grown) > self.cache.slots:
                yield start, t
                start, grown = t, pred[t].copy()
            union = grown
        yield start, len(pred)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        xs = x.reshape(-1, shape[-1])  # (N, d_model)
        decode = xs.shape[0] == 1
        s = self.stats
        t0 = time.perf_counter()
        if self.profile:
            mx.eval(xs)
        t1 = time.perf_counter()
        ahead = decode and self.lookahead is not None
        scores = self.predictor(xs)
        if ahead:  # the next layer's neurons, predicted from this input, in the same sync
            scores = mx.concatenate([scores, self.lookahead(xs)], axis=-1)
        scores = to_host(scores.astype(mx.float32))  # (N, d_ff [+ next d_ff]): the layer's one host sync
        look = None
        if ahead:  # read once this layer's own reads are done
            look = np.flatnonzero(scores[0, self.spec.d_ff :] > self.look_tau)
            scores = scores[:, : self.spec.d_ff]
        pred = scores > self.tau
        if self.pinned is not None:  # always computed: not the window's to hold
            pred[:, self.pinned.neurons] = False
        t2 = time.perf_counter()
        fetched = self.prefetcher.take(self.layer) if self.prefetcher is not None else None
        if self._last is not None:
            mx.eval(self._last)  # normally done already (the next layer's sync); rows move below
        if decode:
            s.predicted += int(np.count_nonzero(pred))
            if self.profile:
                s.attention_s += t1 - t0
                s.predict_s += t2 - t1
            else:
                s.compute_s += t2 - t0
            if self.layer == 0:
                s.decode_tokens += 1
        elif self.layer == 0:
            s.prompt_tokens += len(pred)

        if not decode and self.prompt is not None and self.prompt_mode == "pass":
            return self.prompt_pass(xs, pred, scores).reshape(shape)  # no groups to cut
        groups = list(self.groups(pred))
        if not decode and self.prompt is not None and \
                choose(self.prompt_mode, pred, groups, self.cache.neuron_to_slot >= 0, self.spec.d_ff):
            return self.prompt_pass(xs, pred, scores).reshape(shape)
        if not decode:
            s.prompt_window_steps += len(groups)
        outs = []
        for a, b in groups:
            if outs:
                mx.eval(outs[-1])  # the previous group's rows are about to move
            active = np.flatnonzero(pred[a:b].any(axis=0))
            if len(active) > self.cache.slots:  # best first, for the cache's truncation
                active = active[np.argsort(-scores[a:b, active].max(axis=0), kind="stable")]
            moved0, shrinks0, trunc0 = self.cache.stats.bytes_moved, self.cache.stats.window_shrinks, \
                self.cache.stats.truncations
            step = load_active(self.cache, self.reader, self.layer, self.staging, active,
                               fetched[:2] if fetched is not None and decode else None)
            t5 = time.perf_counter()
            n = step.n
            if n:
                y = bundle_ffn(xs[a:b], self.spec, self.buffer.fields(n), self.down_bias, self.quant)
            else:  # nothing predicted: MLX's quantized kernels cannot take zero rows
                y = mx.zeros_like(xs[a:b]) + (self.down_bias if self.down_bias is not None else 0)
            if self.pinned is not None:
                y = y + self.pinned(xs[a:b], self.spec, self.quant)
            if self.profile:
                mx.eval(y)
            t6 = time.perf_counter()
            outs.append(y)
            s.add_read(step.read, (step.new - step.filled) * self.staging.layout.stride, decode)
            if not decode:
                s.prompt_memory_s += step.memory_s
            if decode:
                s.memory_s += step.memory_s
                s.io_s += step.io_s
                s.io_exposed_s += step.io_s
                s.needed += step.new - step.filled
                if fetched is not None:  # read in the background: its time counts as I/O, its wait as exposed
                    neurons, _, read, waited = fetched
                    s.io_s += read.seconds
                    s.io_exposed_s += waited
                    s.add_read(read, 0, decode)
                    s.prefetch_hits += step.hits
                    s.prefetch_wasted += len(neurons) - step.hits
                    fetched = None
                s.ffn_s += t6 - t5 if self.profile else 0.0
                s.resident += n
                s.bytes_moved += self.cache.stats.bytes_moved - moved0
                s.window_shrinks += self.cache.stats.window_shrinks - shrinks0
                s.truncations += self.cache.stats.truncations - trunc0
        if look is not None:  # after this layer's reads: queued before them, it would delay them on the same threads
            self.next.prefetch(look)
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        self._last = y
        return y.reshape(shape)

    def prompt_pass(self, xs: mx.array, pred: np.ndarray, scores: np.ndarray) -> mx.array:
        """The prompt's FFN over every bundle (flash.prompt); the window keeps the neurons predicted
        for its last `window` tokens, best first."""
        k = self.cache.window
        warm = np.flatnonzero(pred[-k:].any(axis=0))
        warm = warm[np.argsort(-scores[-k:, warm].max(axis=0), kind="stable")]
        y, p = self.prompt.run(self.layer, xs, self.spec, self.quant, self.down_bias, self.cache, warm)
        s = self.stats
        s.add_read(p.read, p.read.bytes_read, decode=False)
        s.prompt_passes += 1
        s.prompt_io_exposed_s += p.io_exposed_s
        s.prompt_memory_s += p.memory_s
        s.prompt_compute_s += p.compute_s
        self._last = y
        return y
