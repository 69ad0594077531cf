"""Flash mode on a model: load the predictors, plan the budget, give every layer a FlashFFN."""

from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import FlashError
from ..format import FlashConfig
from .budget import (DEFAULT_MAX_KV_SIZE, DEFAULT_THREADS, Plan, model_bytes, plan,
                     predictor_level)
from .bundle_reader import BundleBuffer, BundleReader
from .ffn import FlashFFN, FlashStats
from .neuron_cache import NeuronBuffer, NeuronCache
from .outliers import PinnedNeurons
from .predictor import load_predictors
from .prefetch import Prefetcher
from .prompt import MODES as PROMPT_MODES
from .prompt import PromptPass


def trained_predictors(folder: Path, cfg: FlashConfig, recall: Optional[float] = None,
                       bits: Optional[int] = 8, lookahead: bool = False) -> Tuple[List, List[float]]:
    """The calibrated predictors (lookahead: the lookahead ones, None at layer 0) and their thresholds
    at a recall level, quantized to `bits` in memory."""
    if cfg.predictors is None:
        raise FlashError(
            f"{folder} has no activation predictors: run python -m mlx_flash.train_predictors --model {folder}")
    look = cfg.predictors.get("lookahead")
    if lookahead and not look:
        raise FlashError(f"{folder} has no lookahead predictors for --prefetch: run python -m "
                         f"mlx_flash.train_predictors --model {folder} --lookahead")
    pfile = Path(folder) / cfg.predictors["file"]
    if not pfile.is_file():
        raise FlashError(f"{pfile} is missing: run python -m mlx_flash.train_predictors --model {folder}")
    try:
        predictors = load_predictors(mx.load(str(pfile)), cfg.n_layers, look["prefix"] if lookahead else "")
    except Exception as e:
        raise FlashError(f"{pfile} is corrupt: {str(e).splitlines()[0]}")
    taus = predictor_level(look if lookahead else cfg.predictors, recall)["tau"]
    if bits:
        # 8-bit predictors halve their share of the budget; their scores move by well under tau's margin
        for p in predictors:
            if p is not None:
                nn.quantize(p, 32, bits, class_predicate=lambda _, m: isinstance(m, nn.Linear)
                            and m.weight.shape[-1] % 32 == 0)
    mx.eval([p.parameters() for p in predictors if p is not None])
    return predictors, taus


def resident_facts(model, down_bias) -> Tuple[int, int, int]:
    """What the resident part weighs, allocates per token, and computes in:
    (weight bytes, per-token transient bytes, bytes per activation element)."""
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters())) + sum(
        b.nbytes for b in down_bias if b is not None)
    # a quantized LM head casts its scales and biases to float32 every token (measured on the built-in model)
    embed = next(m for path, m in model.named_modules() if path.endswith("embed_tokens"))
    head = next((m for path, m in model.named_modules() if path.endswith("lm_head")), embed)
    transient = 4 * (head.scales.size + head.biases.size) if "scales" in head else 0
    # activations (and so the KV cache) take the dtype that embeddings meet the first norm in:
    # float32 for the built-in model, whose embeddings are float16 but whose norms are float32
    # (the first layer with a norm: a pipeline rank's layers of other ranks have none, mlx_flash.pipeline)
    norm = next(m for layer in model.layers for name, m in layer.children().items() if "norm" in name)
    x = mx.zeros((1, model.ffn_spec.d_model), embed.scales.dtype if "scales" in embed else embed.weight.dtype)
    item = norm(x).dtype.size
    return resident, transient, item


def plan_flash(model, folder: Path, cfg: FlashConfig, down_bias, predictors, dram_budget=None, window=None,
               max_kv_size: int = DEFAULT_MAX_KV_SIZE, prefill_step: Optional[int] = None,
               slots: Optional[int] = None, recall: Optional[float] = None, prefetch: bool = False,
               facts: Optional[Tuple[int, int, int]] = None) -> Plan:
    """The budget plan of flash mode for this model and these predictors (flash.budget.plan);
    predictors: every predictor held in memory (lookahead ones included); facts: resident_facts' when
    the model holds only part of its weights (a pipeline rank: mlx_flash.pipeline)."""
    resident, transient, item = facts or resident_facts(model, down_bias)
    predictor_bytes = sum(v.nbytes for p in predictors if hasattr(p, "parameters")
                          for _, v in tree_flatten(p.parameters()))
    return plan(folder, cfg, resident, predictor_bytes, dram_budget, window, max_kv_size, slots, recall, transient,
                prefill_step, item, prefetch)


def smallest_budget(model, folder: Path, cfg: FlashConfig, down_bias, predictors, window=None,
                    max_kv_size: int = DEFAULT_MAX_KV_SIZE, recall: Optional[float] = None) -> int:
    """The smallest DRAM budget flash mode's plan accepts (bisection over plan_flash)."""
    lo, hi = 0, 4 * model_bytes(folder, cfg) + cfg.n_layers * cfg.d_ff * cfg.layout.stride
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            plan_flash(model, folder, cfg, down_bias, predictors, mid, window, max_kv_size, recall=recall)
            hi = mid
        except FlashError:
            lo = mid + 1
    return lo


def attach_flash(model, folder: Path, cfg: FlashConfig, down_bias, dram_budget=None, window=None,
                 threads: int = DEFAULT_THREADS, coalesce_gap: int = 0, direct: bool = True, verify: bool = True,
                 max_kv_size: int = DEFAULT_MAX_KV_SIZE, prefill_step: Optional[int] = None,
                 slots: Optional[int] = None, predictor=None, recall: Optional[float] = None,
                 predictor_bits: Optional[int] = 8, profile: bool = False, prefetch: Optional[bool] = None,
                 lookahead=None, prompt_mode: str = "auto", facts: Optional[Tuple[int, int, int]] = None):
    """Give every layer a FlashFFN. predictor: None (the trained ones) or a list of callables
    (N, d_model) -> (N, d_ff) scores with threshold 0 (an oracle, in tests and evaluation).
    recall: one of the calibrated recall levels (default: the training target).
    predictor_bits: quantize the predictors to this many bits in memory (None: float16, as stored).
    max_kv_size, prefill_step: the context reserved and the prompt chunk (flash.budget; None: planned).
    profile: time attention, prediction and FFN apart (extra host syncs; the benchmark).
    prefetch: read each layer's predicted neurons while the layer before computes (flash.prefetch),
    with the trained lookahead predictors or `lookahead` (callables like `predictor`, None at layer 0).
    None: on when there are lookahead predictors and the budget holds them with their second staging
    area (measured faster at the same budget: README, same-budget table), off otherwise.
    prompt_mode: "auto" (per prompt and layer, from the predicted bytes), "pass" (every bundle, read
    once in sequential slices through the staging area) or "window" (window steps): flash.prompt.
    facts: what the resident part weighs (plan_flash), given by a pipeline rank."""
    folder = Path(folder)
    if cfg.predictors is None:
        raise FlashError(
            f"{folder} has no activation predictors: run python -m mlx_flash.train_predictors --model {folder}")
    if threads < 1:
        raise FlashError("--threads must be at least 1")
    if prompt_mode not in PROMPT_MODES:
        raise FlashError(f"--prompt-mode must be one of {', '.join(PROMPT_MODES)}")
    if predictor is None:
        predictors, taus = trained_predictors(folder, cfg, recall, predictor_bits)
    else:
        predictors, taus = predictor, [0.0] * cfg.n_layers
    auto = prefetch is None
    if auto:
        prefetch = lookahead is not None or bool(cfg.predictors.get("lookahead"))
    no_lookahead = [None] * cfg.n_layers, [0.0] * cfg.n_layers
    looks, look_taus = no_lookahead
    if prefetch:
        looks, look_taus = (lookahead, look_taus) if lookahead is not None else \
            trained_predictors(folder, cfg, recall, predictor_bits, lookahead=True)
    try:
        pl = plan_flash(model, folder, cfg, down_bias, predictors + looks, dram_budget, window, max_kv_size,
                        prefill_step, slots, recall, prefetch, facts)
    except FlashError:
        if not (auto and prefetch):
            raise
        (looks, look_taus), prefetch = no_lookahead, False  # the budget holds flash, not its prefetch as well
        pl = plan_flash(model, folder, cfg, down_bias, predictors, dram_budget, window, max_kv_size,
                        prefill_step, slots, recall, prefetch, facts)

    reader = BundleReader(folder, cfg, threads=threads, direct=direct, verify=verify)
    stats = FlashStats(n_layers=cfg.n_layers, d_ff=cfg.d_ff)
    spec = model.ffn_spec
    staging = BundleBuffer(pl.staging_rows, cfg.layout)  # shared: layers run one after another
    scratch = staging.np.reshape(-1)  # row moves happen before a layer's reads, so they can share it
    prompt = PromptPass(reader, staging)  # the staging area's halves, between a layer's own reads
    reader.before_close.append(prompt.close)
    ffns = []
    for l, layer in enumerate(model.layers):
        buf = NeuronBuffer(pl.slots[l], cfg.layout, scratch)
        cache = NeuronCache(cfg.d_ff, pl.slots[l], pl.window, buffer=buf, coalesce_gap=coalesce_gap)
        layer.mlp = FlashFFN(l, spec, cfg.quantization, predictors[l], taus[l], buf, cache, reader, staging,
                             down_bias[l], stats, profile)
        layer.mlp.prompt, layer.mlp.prompt_mode = prompt, prompt_mode
        if pl.pinned[l]:
            layer.mlp.pinned = PinnedNeurons(l, pl.pinned[l], cfg, reader, staging, scratch)
        ffns.append(layer.mlp)
    if prefetch:
        prefetcher = Prefetcher(reader, cfg.layout, pl.staging_rows)
        reader.before_close.append(prefetcher.close)  # its reads use the reader's threads
        for l, f in enumerate(ffns):
            f.prefetcher = prefetcher
            if l + 1 < len(ffns) and looks[l + 1] is not None:  # layer l reads ahead for layer l + 1
                f.lookahead, f.look_tau, f.next = looks[l + 1], look_taus[l + 1], ffns[l + 1]
    if pl.budget is not None:
        mx.set_cache_limit(0)  # freed MLX buffers go back to the OS instead of counting against the budget
    mx.reset_peak_memory()  # peak memory from here on is flash mode's own
    model.kv_step = pl.max_kv_size  # the KV cache is allocated whole, once (sources.instantiate's make_cache)
    model.flash_stats = stats
    model.flash_plan = pl
    model.flash_prefetch = prefetch
    model.flash_reader = reader
