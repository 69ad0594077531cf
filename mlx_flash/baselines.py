"""The paper's baselines (Section 4, Table 2): half the model in DRAM, the rest read every token.

Both baselines keep attention, embeddings and norms resident plus whole FFN
layers while the weights held stay within a share of the model (the paper:
"half of the model"); the FFN of every other layer is read in full, every token.
What they need besides (one streamed layer, KV cache, working memory) is
planned and reported (`BaselinePlan.total`), not part of that share:

- `MmapFFN` ("naive"): the layer's bundles through a memory map of `ffn.bundles`
  whose pages are cold every token. Touching them faults them in (I/O), copying
  their fields into the packed arrays the FFN computes on and evicting the pages
  again (`system.MappedBundles.evict`: madvise + posix_fadvise on Linux,
  msync(MS_INVALIDATE) on macOS) is memory management; mincore then checks that
  the pages went.
- `HybridFFN` (the paper's stronger baseline): large sequential direct reads of the
  whole layer (I/O) into a staging area, fields copied into packed arrays (memory).

Both compute on packed per-field arrays (flash.neuron_cache.NeuronBuffer, one shared
by the streamed layers), like flash mode and the dense row: MLX would copy the strided
fields of whole bundles at every matmul, which would handicap the baselines.
- `ResidentFFN`: a dense layer kept in DRAM (the resident half, and the dense row).

All of them fill a `flash.ffn.FlashStats` with the same phases as `FlashFFN`
(attention = everything computed since the previous FFN; I/O; memory
management; FFN compute), so the benchmark's rows are comparable.

    model, down_bias = load_resident(folder, cfg)
    ctx = attach_baseline(model, folder, cfg, down_bias, "mmap", weights_budget=0.5)
    ...                      # generate; ctx.stats.snapshot() per decode token
    ctx.close()
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import FlashError
from .flash.attach import resident_facts
from .flash.budget import DEFAULT_MAX_KV_SIZE, DEFAULT_PREFILL_STEP, kv_bytes, model_bytes, staging_rows, working_bytes
from .flash.bundle_reader import BundleBuffer, BundleReader
from .flash.ffn import FlashStats
from .flash.neuron_cache import NeuronBuffer
from .format import BUNDLES_FILE, PAGE, FlashConfig, field_arrays, round_up
from .models.ffn import BundleFFN, FFNSpec, bundle_ffn
from .sizes import parse_budget
from .system import MappedBundles, drop_cache, major_faults, readahead_bytes

KINDS = ("mmap", "hybrid")
DEFAULT_SHARE = 0.5  # the paper's baselines hold half of the model


# MARK: - typed views over a (n, stride) MLX array of bundles


@dataclass
class MapStats:
    """What the page cache did in the naive row (beyond FlashStats)."""

    major_faults: int = 0  # decode tokens only
    warm_bytes: int = 0  # bytes of a layer already cached before its first touch (readahead of the layer before)
    peak_cached_bytes: int = 0  # largest page-cache footprint of ffn.bundles seen (before each eviction)
    evicted_bytes: int = 0  # decode tokens: bytes the evictions covered
    stayed_cached_bytes: int = 0  # of those, what mincore still found cached right after (0: verified cold)
    bookkeeping_s: float = 0.0  # the benchmark's own mincore checks: taken off the token's time

    def reset(self):
        self.__init__()


# MARK: - FFN providers


class _Timed(nn.Module):
    """Shared per-call bookkeeping: attention time (evaluating the input) and token counting."""

    def __init__(self, layer: int, stats: FlashStats):
        super().__init__()
        self.layer, self.stats = layer, stats

    def _begin(self, x: mx.array):
        xs = x.reshape(-1, x.shape[-1])  # (N, d_model)
        decode = xs.shape[0] == 1
        t0 = time.perf_counter()
        mx.eval(xs)
        if decode:
            self.stats.attention_s += time.perf_counter() - t0
            if self.layer == 0:
                self.stats.decode_tokens += 1
        elif self.layer == 0:
            self.stats.prompt_tokens += xs.shape[0]
        return xs, decode


class ResidentFFN(_Timed):
    """A dense layer held in DRAM (bundles copied once), timed like the others."""

    def __init__(self, layer: int, ffn: BundleFFN, stats: FlashStats):
        super().__init__(layer, stats)
        self.ffn = ffn
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        xs, decode = self._begin(x)
        t0 = time.perf_counter()
        y = self.ffn(xs)
        mx.eval(y)
        if decode:
            self.stats.ffn_s += time.perf_counter() - t0
        return y.reshape(x.shape)


class MmapFFN(_Timed):
    """Naive baseline: the whole layer through cold pages of a memory map, every token.

    I/O: touching one byte per page faults the layer in (with the kernel's readahead,
    as any mmap user gets). Memory management: the copy into an MLX array and the
    eviction. `last` evicts the whole file (readahead past the layers read).
    """

    def __init__(self, layer: int, spec: FFNSpec, cfg: FlashConfig, mapped: MappedBundles, packed: NeuronBuffer,
                 down_bias, stats: FlashStats, map_stats: MapStats, evict: bool = True, last: bool = False):
        super().__init__(layer, stats)
        self.spec, self.cfg, self.mapped, self.packed = spec, cfg, mapped, packed
        self.down_bias, self.map_stats = down_bias, map_stats
        self.evict, self.last = evict, last
        self.offset = cfg.layers[layer]["offset"]
        self.nbytes = cfg.d_ff * cfg.layout.stride
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        xs, decode = self._begin(x)
        s, ms = self.stats, self.map_stats
        flat = self.mapped.np[self.offset : self.offset + self.nbytes]
        tw = time.perf_counter()
        if decode:
            warm = self.mapped.resident_bytes(self.offset, self.nbytes)
        faults0 = major_faults()
        t0 = time.perf_counter()
        int(flat[::PAGE].max())  # one byte per page: the page faults (disk reads) happen here
        t1 = time.perf_counter()
        self.packed.fill(slice(0, self.cfg.d_ff), flat.reshape(self.cfg.d_ff, self.cfg.layout.stride))
        t2 = time.perf_counter()
        cached = self.mapped.resident_bytes()  # bookkeeping of the benchmark, not timed
        t3 = time.perf_counter()
        span = (0, self.mapped.size) if self.last else (self.offset, round_up(self.nbytes, PAGE))
        if self.evict:
            self.mapped.evict(*span)
        t4 = time.perf_counter()
        if self.evict and decode:  # did the pages go? (bookkeeping, not timed)
            ms.evicted_bytes += span[1]
            ms.stayed_cached_bytes += self.mapped.resident_bytes(*span)
        t5 = time.perf_counter()
        y = bundle_ffn(xs, self.spec, self.packed.fields(self.cfg.d_ff), self.down_bias, self.cfg.quantization)
        mx.eval(y)  # before the next layer refills the packed arrays
        t6 = time.perf_counter()
        ms.peak_cached_bytes = max(ms.peak_cached_bytes, cached)
        if decode:
            s.io_s += t1 - t0
            s.memory_s += (t2 - t1) + (t4 - t3)
            s.ffn_s += t6 - t5
            s.bytes_read += self.nbytes
            s.bytes_requested += self.nbytes
            s.bundles += self.cfg.d_ff
            s.resident += self.cfg.d_ff
            s.syscalls += major_faults() - faults0
            s.bytes_moved += self.nbytes  # the copy
            ms.major_faults += major_faults() - faults0
            ms.warm_bytes += warm
            ms.bookkeeping_s += (t0 - tw) + (t3 - t2) + (t5 - t4)
        else:
            s.prompt_io_s += t1 - t0
            s.prompt_bytes_read += self.nbytes
        return y.reshape(x.shape)


class HybridFFN(_Timed):
    """Hybrid baseline: the whole layer in large direct reads, every token, through a staging area
    (rounds of its rows) into the packed arrays shared by the streamed layers."""

    def __init__(self, layer: int, spec: FFNSpec, cfg: FlashConfig, reader: BundleReader, staging: BundleBuffer,
                 packed: NeuronBuffer, down_bias, stats: FlashStats):
        super().__init__(layer, stats)
        self.spec, self.cfg, self.reader = spec, cfg, reader
        self.staging, self.packed = staging, packed
        self.down_bias = down_bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        xs, decode = self._begin(x)
        s = self.stats
        io = copy = 0.0
        for k in range(0, self.cfg.d_ff, self.staging.slots):
            part = np.arange(k, min(k + self.staging.slots, self.cfg.d_ff))
            t0 = time.perf_counter()
            read = self.reader.read(self.layer, part, self.staging)
            t1 = time.perf_counter()
            self.packed.fill(part, self.staging.np[: len(part)])
            copy, io = copy + time.perf_counter() - t1, io + t1 - t0
            s.add_read(read, read.bytes_read, decode)
        t2 = time.perf_counter()
        y = bundle_ffn(xs, self.spec, self.packed.fields(self.cfg.d_ff), self.down_bias, self.cfg.quantization)
        mx.eval(y)  # before the next layer refills the packed arrays
        if decode:
            s.io_s += io
            s.memory_s += copy
            s.ffn_s += time.perf_counter() - t2
            s.resident += self.cfg.d_ff
        return y.reshape(x.shape)


# MARK: - what stays resident, and attaching the providers


@dataclass
class BaselinePlan:
    """What a baseline row holds in DRAM, in bytes."""

    kind: str
    budget: int  # for the weights held (attention, embeddings, resident FFN layers)
    model: int
    resident: int  # attention, embeddings, norms (resident.safetensors as loaded)
    layer_bytes: int  # one FFN layer in DRAM: d_ff x stride (resident layers keep their fields: d_ff x field bytes)
    dense_layers: List[int]  # FFN layers held in DRAM
    staging: int  # the packed arrays of one streamed layer + hybrid: its read staging; mmap: the layer's pages
    # and the readahead around them
    kv_cache: int
    working: int
    n_layers: int

    @property
    def streamed(self) -> int:
        return self.n_layers - len(self.dense_layers)

    @property
    def fixed(self) -> int:
        """Everything but the resident FFN layers, when at least one layer is streamed."""
        return self.resident + self.staging + self.kv_cache + self.working

    @property
    def total(self) -> int:
        staging = self.staging if self.streamed else 0  # nothing streamed: no staging needed either
        return self.fixed - self.staging + staging + len(self.dense_layers) * self.layer_bytes

    @property
    def weights_in_memory(self) -> int:
        return self.resident + len(self.dense_layers) * self.layer_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "weights_in_memory": self.weights_in_memory,
                "streamed": self.streamed}


def plan_baseline(folder: Path, cfg: FlashConfig, facts, kind: str, weights_budget=DEFAULT_SHARE,
                  max_kv_size: int = DEFAULT_MAX_KV_SIZE) -> BaselinePlan:
    """Attention, embeddings and norms, then whole FFN layers (the first ones) while the weights held
    stay within `weights_budget` (a share of the model such as 0.5, or bytes such as '60M').
    facts: flash.attach.resident_facts (weights, per-token transient, activation item size)."""
    resident_bytes, transient, item = facts
    assert kind in KINDS
    total = model_bytes(folder, cfg)
    budget = parse_budget(DEFAULT_SHARE if weights_budget is None else weights_budget, total)
    layer_bytes = cfg.d_ff * cfg.layout.stride
    staging = cfg.d_ff * cfg.layout.field_bytes + (staging_rows(cfg) * cfg.layout.stride if kind == "hybrid" else 0)
    if kind == "mmap":  # a fault reads the readahead window around it: that much more sits in the page cache
        staging += min(cfg.file_size, layer_bytes + readahead_bytes(Path(folder) / BUNDLES_FILE))
    if resident_bytes > budget:
        raise FlashError(
            f"the {kind} baseline keeps attention and embeddings ({resident_bytes / 1e6:.1f} MB) in memory, more "
            f"than its share of the weights ({budget / 1e6:.1f} MB, {budget / total:.0%} of the model): give a "
            f"larger --baseline-share")
    k = int(min(cfg.n_layers, (budget - resident_bytes) // layer_bytes))
    working = working_bytes(cfg, transient, min(DEFAULT_PREFILL_STEP, max_kv_size), max_kv_size, item)
    return BaselinePlan(kind, budget, total, resident_bytes, layer_bytes, list(range(k)), staging,
                        kv_bytes(cfg, max_kv_size, item), working, cfg.n_layers)


def read_layer(folder: Path, cfg: FlashConfig, layer: int) -> np.ndarray:
    """(d_ff, stride) bytes of one layer, read once through the page cache."""
    n = cfg.d_ff * cfg.layout.stride
    with open(Path(folder) / BUNDLES_FILE, "rb") as f:
        f.seek(cfg.layers[layer]["offset"])
        data = np.frombuffer(f.read(n), dtype=np.uint8)
    if data.size != n:
        raise FlashError(f"{Path(folder) / BUNDLES_FILE} is truncated: layer {layer} is incomplete")
    return data.reshape(cfg.d_ff, cfg.layout.stride)


def resident_layer(model, cfg: FlashConfig, layer: int, rows: np.ndarray, down_bias, stats) -> ResidentFFN:
    fields = {k: tuple(map(mx.contiguous, v)) if isinstance(v, tuple) else mx.contiguous(v)
              for k, v in field_arrays(mx.array(rows), cfg.layout).items()}
    mx.eval(fields)
    return ResidentFFN(layer, BundleFFN(model.ffn_spec, fields, down_bias, cfg.quantization), stats)


@dataclass
class Attached:
    """A row's FFN providers and what to close after it."""

    stats: FlashStats
    plan: object = None
    map_stats: Optional[MapStats] = None
    mapped: Optional[MappedBundles] = None
    reader: Optional[BundleReader] = None

    def close(self):
        if self.reader is not None:
            self.reader.close()
        if self.mapped is not None:
            self.mapped.close()


def attach_dense_timed(model, folder: Path, cfg: FlashConfig, down_bias) -> Attached:
    """Every layer dense and resident (the upper bound), timed like the other rows."""
    stats = FlashStats(n_layers=cfg.n_layers, d_ff=cfg.d_ff)
    for l, layer in enumerate(model.layers):
        layer.mlp = resident_layer(model, cfg, l, read_layer(folder, cfg, l), down_bias[l], stats)
    drop_cache(Path(folder) / BUNDLES_FILE)  # the rows after this one start cold
    return Attached(stats)


def attach_baseline(model, folder, cfg: FlashConfig, down_bias, kind: str, weights_budget=DEFAULT_SHARE,
                    max_kv_size: int = DEFAULT_MAX_KV_SIZE, threads: int = 32, direct: bool = True, verify: bool = False,
                    evict: bool = True) -> Attached:
    """Give every layer its baseline provider. The model's mlp slots must be empty (load_resident)."""
    folder = Path(folder)
    if kind not in KINDS:
        raise FlashError(f"unknown baseline '{kind}' (choose from {', '.join(KINDS)})")
    pl = plan_baseline(folder, cfg, resident_facts(model, down_bias), kind, weights_budget, max_kv_size)
    stats = FlashStats(n_layers=cfg.n_layers, d_ff=cfg.d_ff)
    out = Attached(stats, pl)
    streamed = [l for l in range(cfg.n_layers) if l not in pl.dense_layers]
    if kind == "mmap":
        out.mapped = MappedBundles(folder / BUNDLES_FILE)
        out.map_stats = MapStats()
    else:
        out.reader = BundleReader(folder, cfg, threads=threads, direct=direct, verify=verify)
    if streamed:  # shared: the streamed layers run one after another
        staging = BundleBuffer(staging_rows(cfg), cfg.layout) if kind == "hybrid" else None
        packed = NeuronBuffer(cfg.d_ff, cfg.layout, np.zeros(0, np.uint8))  # filled whole, rows never move
    for l, layer in enumerate(model.layers):
        if l in pl.dense_layers:
            layer.mlp = resident_layer(model, cfg, l, read_layer(folder, cfg, l), down_bias[l], stats)
        elif kind == "mmap":
            layer.mlp = MmapFFN(l, model.ffn_spec, cfg, out.mapped, packed, down_bias[l], stats, out.map_stats,
                                evict=evict, last=l == streamed[-1])
        else:
            layer.mlp = HybridFFN(l, model.ffn_spec, cfg, out.reader, staging, packed, down_bias[l], stats)
    model.kv_step = max_kv_size  # the planned context, allocated once (sources.instantiate's make_cache)
    # reading the resident layers went through the page cache; and pages cached (and charged) before,
    # by anyone, would be warm for the naive row even inside a memory cgroup
    drop_cache(folder / BUNDLES_FILE)
    if out.mapped is not None:
        out.mapped.evict()
    return out
