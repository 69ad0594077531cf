"""A converted mixture-of-experts folder loaded dense or in flash mode, within a planned DRAM budget.

    model, store = load_experts(folder, "flash", dram_budget="30%")   # (load.load_flash calls this)

Resident: mlx-lm's model with everything but the routed experts (attention, norms, embeddings, routers,
shared experts, dense layers). Dense mode reads every expert once into a SwitchGLU; flash mode gives
each MoE layer a FlashExperts over `slots` expert slots (flash/experts.py).

The plan (`plan_experts`) counts what flash mode holds: the resident part, the KV cache of the context
reserved (`max_kv_size`, allocated once), a prompt chunk's working memory (with, on MLX's CPU backend,
its numpy matmuls': an expert's float32 weights, the chunk's pairs), the reads' staging area
(a token's top-k extents; three such areas with lookahead), the prompt pass's two halves (top-k experts
in all, flash/expert_prompt.py) and the slots of every MoE layer. The slots
are as many as the budget leaves room for, up to every expert; fewer than a token's top-k cannot run,
so that is the smallest budget, and a smaller one is refused in one line with the numbers.
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from ..errors import FlashError
from ..expert_format import EXPERTS_FILE, ExpertStore
from ..format import RESIDENT_FILE
from ..models.architectures import architecture, moe_blocks
from ..sizes import parse_budget
from ..sources import instantiate, mismatch, quantize_like
from ..system import release_pages
from .attach import resident_facts
from .budget import (DEFAULT_MAX_KV_SIZE, DEFAULT_PREFILL_STEP, DEFAULT_THREADS, kv_bytes, numpy_expert_bytes,
                     working_bytes)
from .bundle_reader import BUFFER_ALIGN, BundleBuffer, BundleReader
from .expert_cache import ExpertCache
from .expert_prompt import MODES as PROMPT_MODES
from .expert_prompt import ExpertPass
from .experts import ExpertStats, FlashExperts
from .neuron_cache import NeuronBuffer
from .prefetch import Prefetcher

DEFAULT_WINDOW = 5  # tokens whose experts are evicted last (the paper's window of k = 4..5 tokens)


@dataclass
class ExpertPlan:
    """Where the DRAM budget goes, in bytes (generate and the server read max_kv_size and prefill_step)."""

    budget: Optional[int]
    model: int  # resident weights + every expert's content
    resident: int
    kv_cache: int
    working: int
    staging: int
    prompt_staging: int  # the prompt pass's two halves of pass_rows experts each
    buffers: int  # the slots of every MoE layer
    slots: int  # expert slots per MoE layer
    experts: int  # routed experts per MoE layer
    smallest: int  # the smallest budget: top-k slots per layer
    moe_layers: int
    window: int
    staging_rows: int
    pass_rows: int
    max_kv_size: int
    prefill_step: int

    @property
    def total(self) -> int:
        return self.resident + self.kv_cache + self.working + self.staging + self.prompt_staging + self.buffers

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def model_bytes(folder: Path, store: ExpertStore) -> int:
    """The model's size: resident weights plus every expert's content (padding and CRC excluded)."""
    return (Path(folder) / RESIDENT_FILE).stat().st_size + len(store.moe_layers) * store.num_experts * \
        store.layout.nbytes


def plan_experts(store: ExpertStore, total: int, resident: int, transient: int = 0, item: int = 4, budget=None,
                 slots: Optional[int] = None, window: Optional[int] = None, max_kv_size: int = DEFAULT_MAX_KV_SIZE,
                 prefill_step: int = DEFAULT_PREFILL_STEP, prefetch: bool = False) -> ExpertPlan:
    """The plan for a budget (bytes, a share of the model `total`, or None: every expert gets a slot), or
    for `slots` slots per MoE layer. Refuses, in one line, what cannot run."""
    window = window or DEFAULT_WINDOW
    if window < 1 or max_kv_size < 1 or prefill_step < 1:
        raise FlashError("--window, --max-kv-size and --prefill-step must be at least 1")
    if slots is not None and not store.top_k <= slots:
        raise FlashError(f"{slots} expert slots per layer cannot run this model: a token needs its "
                         f"{store.top_k} experts at once")
    budget_bytes = parse_budget(budget, total)
    k, n = store.top_k, len(store.moe_layers)
    chunk = min(prefill_step, max_kv_size)
    kv = kv_bytes(store, max_kv_size, item)
    # a chunk's activations: k experts' hidden units and outputs per token, the router's logits
    geometry = SimpleNamespace(model_config=store.model_config, d_model=store.d_model,
                               d_ff=k * (store.d_ff + store.d_model) + store.num_experts)
    working = working_bytes(geometry, transient, chunk, max_kv_size, item,
                            numpy_expert_bytes(geometry, store.d_ff, k, chunk))
    staging = k * store.layout.stride * (3 if prefetch else 1)  # prefetch: two more areas
    pass_rows = max(1, k // 2)
    prompt_staging = 2 * (pass_rows * store.expert_bytes + len(store.layout.fields) * BUFFER_ALIGN)
    per_slot = n * store.expert_bytes
    align = n * len(store.layout.fields) * BUFFER_ALIGN  # every field array starts on a page
    fixed = resident + kv + working + staging + prompt_staging + align
    smallest = fixed + k * per_slot
    if slots is None:
        slots = store.num_experts if budget_bytes is None else \
            int(min(store.num_experts, max(0, budget_bytes - fixed) // per_slot))
    slots = min(slots, store.num_experts)
    plan = ExpertPlan(budget_bytes, total, resident, kv, working, staging, prompt_staging, align + slots * per_slot,
                      slots, store.num_experts, smallest, n, window, k, pass_rows, max_kv_size, prefill_step)
    if budget_bytes is not None and (slots < k or plan.total > budget_bytes):
        raise FlashError(
            f"a DRAM budget of {budget_bytes / 1e6:.1f} MB cannot run this model in flash mode: resident weights "
            f"{resident / 1e6:.1f} MB + KV cache of {max_kv_size} tokens {kv / 1e6:.1f} MB + working memory "
            f"{working / 1e6:.1f} MB + read staging {staging / 1e6:.1f} MB + prompt pass staging "
            f"{prompt_staging / 1e6:.1f} MB + {max(slots, k)} expert slots in each of "
            f"{n} MoE layers {(align + max(slots, k) * per_slot) / 1e6:.1f} MB need "
            f"{max(plan.total, smallest) / 1e6:.1f} MB; the smallest budget is {smallest / 1e6:.1f} MB "
            f"({smallest / total:.0%} of the model's {total / 1e6:.1f} MB: {k} slots, a token's experts)")
    return plan


def load_resident_moe(folder: Path, store: ExpertStore):
    """mlx-lm's model with everything but the routed experts loaded; returns (model, {layer: its MoE block},
    {layer: the block's SwitchGLU as built, weights not yet set})."""
    model = instantiate(store.model_config)
    moe = architecture(store.model_config).moe
    blocks = moe_blocks(model)
    switches = {l: getattr(b, moe.switch) for l, b in blocks.items()}
    for b in blocks.values():
        setattr(b, moe.switch, nn.Module())  # streamed: no weights of its own in the resident part
    try:
        weights = mx.load(str(folder / RESIDENT_FILE))
    except Exception as e:
        raise FlashError(f"{folder / RESIDENT_FILE} is corrupt: {e}")
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantize_like(model, weights, store.model_config.get("quantization"))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise FlashError(f"{folder / RESIDENT_FILE} does not match flash.json: {mismatch(e)}")
    mx.eval(model.parameters())  # now, on this thread: a server generates from others
    release_pages(folder / RESIDENT_FILE)
    model.eval()
    return model, blocks, switches


def slot_glu(glu: nn.Module, buffer: NeuronBuffer, store: ExpertStore) -> nn.Module:
    """mlx-lm's SwitchGLU `glu` computing on `buffer`'s slots: its stacked weights become the buffer's
    field arrays, (slots, out, in), the same memory the reads write into."""
    arrays = buffer.arrays(buffer.slots)
    mx.eval(arrays)  # views, evaluated without a copy, here: a server computes on them from another thread
    q = store.quantization
    for proj in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(glu, proj)
        if q is not None and not isinstance(lin, QuantizedSwitchLinear):
            lin = lin.to_quantized(q["group_size"], q["bits"], mode=q.get("mode", "affine"))  # lazy: never computed
            setattr(glu, proj, lin)
        for part in ("weight", "scales", "biases", "bias"):
            if f"{proj}.{part}" in arrays:
                lin[part] = arrays[f"{proj}.{part}"]
    glu.freeze()
    return glu


def load_experts(folder, mode: str = "flash", dram_budget=None, slots: Optional[int] = None,
                 window: Optional[int] = None, threads: int = DEFAULT_THREADS, direct: bool = True,
                 verify: bool = True, max_kv_size: int = DEFAULT_MAX_KV_SIZE,
                 prefill_step: Optional[int] = None, prefetch: Optional[bool] = None, profile: bool = False,
                 recall: Optional[float] = None, prompt_mode: Optional[str] = None):
    """Load a converted MoE folder dense or in flash mode; returns (model, ExpertStore).
    prefetch: lookahead reads (None: off, as measured on this machine: README); prompt_mode: a prompt runs in
    groups of tokens whose experts fit the slots ("window"), as one pass over its experts ("pass"), or
    whichever reads fewer experts, per layer ("auto", the default; flash/expert_prompt.py); the other options
    as flash.attach.attach_flash's."""
    folder = Path(folder)
    store = ExpertStore.load(folder)
    if mode not in ("dense", "flash"):
        raise FlashError(f"unknown mode '{mode}' (choose from dense, flash)")
    if recall is not None:
        raise FlashError("--recall chooses a predictor's recall: a mixture of experts has none (its router is exact)")
    if prompt_mode not in (None, *PROMPT_MODES):
        raise FlashError(f"unknown --prompt-mode {prompt_mode} (choose from {', '.join(PROMPT_MODES)})")
    prefill_step = prefill_step or DEFAULT_PREFILL_STEP
    if threads < 1:
        raise FlashError("--threads must be at least 1")
    model, blocks, switches = load_resident_moe(folder, store)
    moe = architecture(store.model_config).moe
    reader = BundleReader(folder / EXPERTS_FILE, store.extents(), threads=threads, direct=direct, verify=verify,
                          unit="expert")
    if mode == "dense":  # every expert read once into its slot: expert e in slot e
        staging = BundleBuffer(store.num_experts, store.layout)
        everyone = np.arange(store.num_experts)
        for l, block in blocks.items():
            buf = NeuronBuffer(store.num_experts, store.layout, staging.np.reshape(-1))
            reader.read(l, everyone, staging)
            buf.fill(slice(0, store.num_experts), staging.np)
            setattr(block, moe.switch, slot_glu(switches[l], buf, store))
        reader.close()
        model.flash_store = store
        return model, store

    resident, transient, item = resident_facts(model, [])
    prefetch = bool(prefetch)
    pl = plan_experts(store, model_bytes(folder, store), resident, transient, item, dram_budget, slots, window,
                      max_kv_size, prefill_step, prefetch)
    stats = ExpertStats(moe_layers=pl.moe_layers, experts=store.num_experts, expert_bytes=store.layout.stride)
    staging = BundleBuffer(pl.staging_rows, store.layout)  # shared: layers run one after another
    ffns = []
    for l, block in blocks.items():
        buf = NeuronBuffer(pl.slots, store.layout, staging.np.reshape(-1))  # slots never move: no scratch use
        cache = ExpertCache(store.num_experts, pl.slots, pl.window, buffer=buf)
        ffn = FlashExperts(l, slot_glu(switches[l], buf, store), cache, reader, staging, stats, not ffns, profile,
                           prompt_mode or "auto")
        setattr(block, moe.switch, ffn)
        ffns.append((ffn, block))
    passing = ExpertPass(ffns[0][0].glu, store.layout, pl.pass_rows, reader, staging)  # shared: layers take turns
    reader.before_close.append(passing.close)
    for ffn, _ in ffns:
        ffn.passing = passing
    if prefetch:
        prefetcher = Prefetcher(reader, store.layout, pl.staging_rows)
        reader.before_close.append(prefetcher.close)  # its reads use the reader's threads
        for (ffn, _), (nxt, block) in zip(ffns, ffns[1:]):
            ffn.lookahead, ffn.next = getattr(block, moe.router), nxt  # layer l reads ahead for the next MoE layer
        for ffn, _ in ffns:
            ffn.prefetcher = prefetcher
    if pl.budget is not None:
        mx.set_cache_limit(0)  # freed MLX buffers go back to the OS instead of counting against the budget
    mx.reset_peak_memory()
    model.kv_step = pl.max_kv_size  # the KV cache is allocated whole, once (sources.instantiate's make_cache)
    model.flash_stats, model.flash_plan, model.flash_prefetch, model.flash_reader = stats, pl, prefetch, reader
    model.flash_store = store
    return model, store
