"""The routed experts of one MoE layer in flash mode, in place of mlx-lm's SwitchGLU, with its call.

mlx-lm's MoE block (Qwen3-MoE, Mixtral, gpt-oss) computes its router, picks each token's top-k experts
and calls `switch_mlp(x, indices)`, then weighs the k outputs by the router's scores. `FlashExperts`
takes that call. Per token (paper Sections 3.1-3.3, with the router as an exact predictor):
  1. the top-k indices come to the host: the layer's one host sync (with lookahead, the next MoE
     layer's router applied to this layer's input rides along in the same sync);
  2. the layer's ExpertCache maps experts to slots; the missing ones are read with parallel direct
     reads straight into free slots (neuron_cache.load_active over BundleReader.read_into);
  3. mlx-lm's own SwitchGLU, whose stacked weights are the layer's slot buffer (allocated once,
     (slots, out, in) per projection), computes over slot indices: gather_mm / gather_qmm, no copy.
MLX evaluates the output lazily, at the next layer's sync.

A prompt (several tokens) is cut into groups of consecutive tokens whose experts fit the slots, each
group one window step, evaluated before the next group's reads refill its slots: the output equals
the dense MoE's whatever the slots (at least top-k). Or it is one pass over the prompt's experts, each
read once in expert order (flash/expert_prompt.py): `prompt_mode` "auto" takes, per layer and prompt,
the one predicted to read fewer experts. Within flash.prefill on MLX's CPU backend, `glu` is a
NumpySwitchGLU (flash/expert_numpy.py): a prompt's experts multiply in numpy, decoding's in MLX.

Lookahead (flash.prefetch, as for neurons): the experts that layer l+1's router picks from layer l's
input are read in the background while layer l computes; layer l+1 takes the ones it needs (hits)
and drops the others (wasted bytes, reported).
"""

import time
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .expert_prompt import choose
from .ffn import to_host
from .neuron_cache import load_active


@dataclass
class ExpertStats:
    """Time, bytes and expert counts of a model's streamed MoE layers; `snapshot()` per decode token."""

    moe_layers: int = 0
    experts: int = 0  # routed experts per MoE layer
    expert_bytes: int = 0  # bytes read per expert (its extent)
    decode_tokens: int = 0
    prompt_tokens: int = 0
    compute_s: float = 0.0  # waits at the layers' host syncs: what MLX computes (attention, routers, experts)
    memory_s: float = 0.0  # slot bookkeeping, copies of prefetched extents into their slots
    io_s: float = 0.0  # reads, the prefetcher's included
    io_exposed_s: float = 0.0  # the part of io_s the token waited for
    needed: int = 0  # experts the decode tokens routed to, distinct per layer and token
    hits: int = 0  # of those, found in a slot
    experts_read: int = 0  # extents read in decode (misses, and the prefetcher's reads)
    bytes_read: int = 0
    syscalls: int = 0
    window_evictions: int = 0  # experts evicted though used within the window (slots too few for it)
    prompt_experts_read: int = 0
    prompt_bytes_read: int = 0
    prompt_io_s: float = 0.0
    prompt_io_exposed_s: float = 0.0  # the part of prompt_io_s the prompt waited for
    prompt_passes: int = 0  # MoE layers that ran a prompt as one pass over its experts
    prompt_groups: int = 0  # MoE layers that ran a prompt in groups
    prefetched: int = 0  # extents read ahead by the lookahead, decode
    prefetch_hits: int = 0  # of those, needed by their layer
    prefetch_wasted: int = 0  # of those, not needed: dropped

    def add_read(self, read, decode: bool):
        if decode:
            self.experts_read += read.bundles
            self.bytes_read += read.bytes_read
            self.syscalls += read.syscalls
        else:
            self.prompt_experts_read += read.bundles
            self.prompt_bytes_read += read.bytes_read
            self.prompt_io_s += read.seconds

    def reset(self):
        for f in fields(self):
            if f.name not in ("moe_layers", "experts", "expert_bytes"):
                setattr(self, f.name, f.default)

    def prompt_mode(self):
        """How the prompts ran: "pass", "window steps" (groups), both with the share, or None."""
        n = self.prompt_passes + self.prompt_groups
        if not n or not self.prompt_groups:
            return "pass" if n else None
        return "window steps" if not self.prompt_passes else f"pass in {self.prompt_passes} of {n} MoE layer runs"

    def snapshot(self) -> dict:
        t = max(self.decode_tokens, 1)
        ms = lambda s: 1000.0 * s / t
        return {
            "decode_tokens": self.decode_tokens,
            "prompt_tokens": self.prompt_tokens,
            "ms_compute": ms(self.compute_s),
            "ms_memory": ms(self.memory_s),
            "ms_io": ms(self.io_s),
            "ms_io_exposed": ms(self.io_exposed_s),
            "bytes_read_per_token": self.bytes_read / t,
            "mb_read_per_token": self.bytes_read / t / 1e6,
            "experts_read_per_token": self.experts_read / t,
            "experts_needed_per_token": self.needed / t,
            "expert_hit_rate": self.hits / self.needed if self.needed else None,
            "syscalls_per_token": self.syscalls / t,
            "read_gb_per_s": self.bytes_read / self.io_s / 1e9 if self.io_s else 0.0,
            "window_evictions": self.window_evictions,
            "prompt_bytes_read": self.prompt_bytes_read,
            "prompt_experts_read": self.prompt_experts_read,
            "prompt_ms_io": 1000.0 * self.prompt_io_s,
            "prompt_ms_io_exposed": 1000.0 * self.prompt_io_exposed_s,
            "prompt_passes": self.prompt_passes,
            "prompt_groups": self.prompt_groups,
            "prompt_mode": self.prompt_mode(),  # the stats line's "prompt as ..."
            "prefetched_per_token": self.prefetched / t,
            "prefetch_hit_rate": self.prefetch_hits / (self.needed - self.hits)
            if self.prefetched and self.needed > self.hits else None,
            "prefetch_precision": self.prefetch_hits / self.prefetched if self.prefetched else None,
            "prefetch_wasted_mb_per_token": self.prefetch_wasted * self.expert_bytes / t / 1e6,
        }


class FlashExperts(nn.Module):
    """One MoE layer's routed experts in flash mode: `glu` is mlx-lm's SwitchGLU over the slot buffer of
    `cache` (an ExpertCache), `reader` reads extents, `staging` is the model's shared staging area.
    first: the model's first MoE layer (it counts the tokens). profile: evaluate the output here, so
    that compute_s holds each layer's own compute (an extra host sync per layer). prompt_mode: "auto",
    "pass" or "window" (flash/expert_prompt.py); `passing`, the model's ExpertPass, is set by attach."""

    def __init__(self, layer: int, glu: nn.Module, cache, reader, staging, stats: ExpertStats, first: bool,
                 profile: bool = False, prompt_mode: str = "auto"):
        super().__init__()
        self.layer, self.glu, self.cache = layer, glu, cache
        self.reader, self.staging, self.stats, self.first, self.profile = reader, staging, stats, first, profile
        self.prompt_mode, self.passing = prompt_mode, None
        self._last = None  # the latest output, computed on this layer's slots
        # lookahead, set by attach_experts: the next MoE layer's router, its FlashExperts, the Prefetcher
        self.lookahead, self.next, self.prefetcher = None, None, None
        self.freeze()

    def prefetch(self, experts: np.ndarray):
        """The layer before predicted these of this layer's experts: read the absent ones in the background."""
        absent = experts[self.cache.slots_of(experts) < 0]
        self.stats.prefetched += self.prefetcher.start(self.layer, absent)

    def groups(self, ids: np.ndarray):
        """Cut (N, k) routed ids into runs of tokens whose experts fit the slots (N == 1: one run)."""
        start, union = 0, np.zeros(self.cache.experts, dtype=bool)
        for t in range(len(ids)):
            grown = union.copy()
            grown[ids[t]] = True
            if t > start and np.count_nonzero(grown) > self.cache.slots:
                yield start, t
                start, grown = t, np.zeros_like(union)
                grown[ids[t]] = True
            union = grown
        yield start, len(ids)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k = indices.shape[-1]
        xs = x.reshape(-1, x.shape[-1])  # (N, d_model)
        routed = indices.reshape(-1, k)  # (N, k)
        decode = xs.shape[0] == 1
        s = self.stats
        t0 = time.perf_counter()
        ahead = decode and self.lookahead is not None
        if ahead:  # the next MoE layer's top-k from this layer's input, in the same sync
            look = mx.argpartition(self.lookahead(xs), kth=-k, axis=-1)[..., -k:]
            routed = mx.concatenate([routed, look.astype(routed.dtype)], axis=-1)
        ids = to_host(routed).astype(np.int64)  # (N, k [+ k]): the layer's one host sync
        look_ids = np.unique(ids[0, k:]) if ahead else None
        ids = ids[:, :k]
        t1 = time.perf_counter()
        fetched = self.prefetcher.take(self.layer) if self.prefetcher is not None else None
        if self._last is not None:
            mx.eval(self._last)  # normally done already (the next layer's sync); its slots are refilled below
        if decode:
            s.compute_s += t1 - t0
            s.decode_tokens += self.first
        elif self.first:
            s.prompt_tokens += len(ids)

        groups = list(self.groups(ids))
        if not decode and self.passing is not None:
            if choose(self.prompt_mode, self.cache, ids, groups):
                s.prompt_passes += 1
                y, cost = self.passing.run(self.layer, xs, ids, self.cache, self.glu)
                s.add_read(cost.read, False)
                s.prompt_io_exposed_s += cost.io_exposed_s
                self._last = y
                return y.reshape(*indices.shape, x.shape[-1])
            s.prompt_groups += 1
        outs = []
        for a, b in groups:
            if outs:
                mx.eval(outs[-1])  # the previous group's slots may be refilled now
            before = self.cache.stats.snapshot()
            step = load_active(self.cache, self.reader, self.layer, self.staging, ids[a:b],
                               fetched[:2] if fetched is not None and decode else None)
            slots = self.cache.slots_of(ids[a:b]).astype(np.uint32)  # (n, k)
            y = self.glu(xs[a:b], mx.array(slots))  # (n, k, d_model)
            if self.profile:
                t2 = time.perf_counter()
                mx.eval(y)
                s.compute_s += time.perf_counter() - t2 if decode else 0.0
            outs.append(y)
            s.add_read(step.read, decode)
            s.prompt_io_exposed_s += 0.0 if decode else step.io_s
            if decode:
                after = self.cache.stats
                s.needed += after.needed - before.needed
                s.hits += after.hits - before.hits
                s.window_evictions += after.window_evictions - before.window_evictions
                s.memory_s += step.memory_s
                s.io_s += step.io_s
                s.io_exposed_s += step.io_s
                if fetched is not None:  # read in the background: its time is I/O, its wait the exposed part
                    experts, _, read, waited = fetched
                    s.io_s += read.seconds
                    s.io_exposed_s += waited
                    s.add_read(read, decode)
                    s.prefetch_hits += step.hits
                    s.prefetch_wasted += len(experts) - step.hits
                    fetched = None
        if look_ids is not None:  # after this layer's reads: queued before them, it would delay them
            self.next.prefetch(look_ids)
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        self._last = y
        return y.reshape(*indices.shape, x.shape[-1])  # (..., k, d_model), as SwitchGLU returns
