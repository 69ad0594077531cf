"""Flash mode on a model: load the predictors, plan the budget, give every layer a FlashFFN."""

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import FlashError
from ..format import FlashConfig
from .budget import DEFAULT_KV_TOKENS, DEFAULT_THREADS, plan, predictor_level
from .bundle_reader import BundleBuffer, BundleReader
from .ffn import FlashFFN, FlashStats
from .neuron_cache import NeuronBuffer, NeuronCache
from .predictor import load_predictors


def attach_flash(model, folder: Path, cfg: FlashConfig, down_bias, dram_budget=None, window=None,
                 threads: int = DEFAULT_THREADS, coalesce_gap: int = 0, direct: bool = True, verify: bool = True,
                 kv_tokens: int = DEFAULT_KV_TOKENS, slots: Optional[int] = None, predictor=None,
                 recall: Optional[float] = None, predictor_bits: Optional[int] = 8, profile: bool = False):
    """Give every layer a FlashFFN. predictor: None (the trained ones) or a list of callables
    (N, d_model) -> (N, d_ff) scores with threshold 0 (an oracle, in tests and evaluation).
    recall: one of the calibrated recall levels (default: the training target).
    predictor_bits: quantize the predictors to this many bits in memory (None: float16, as stored).
    profile: time attention, prediction and FFN apart (extra host syncs; the benchmark)."""
    folder = Path(folder)
    if cfg.predictors is None:
        raise FlashError(
            f"{folder} has no activation predictors: run python -m mlx_flash.train_predictors --model {folder}")
    if threads < 1:
        raise FlashError("--threads must be at least 1")
    if predictor is None:
        pfile = folder / cfg.predictors["file"]
        if not pfile.is_file():
            raise FlashError(f"{pfile} is missing: run python -m mlx_flash.train_predictors --model {folder}")
        try:
            predictors = load_predictors(mx.load(str(pfile)), cfg.n_layers)
        except Exception as e:
            raise FlashError(f"{pfile} is corrupt: {str(e).splitlines()[0]}")
        taus = predictor_level(cfg, recall)["tau"]
        if predictor_bits:
            # 8-bit predictors halve their share of the budget; their scores move by well under tau's margin
            for p in predictors:
                nn.quantize(p, 32, predictor_bits, class_predicate=lambda _, m: isinstance(m, nn.Linear)
                            and m.weight.shape[-1] % 32 == 0)
    else:
        predictors, taus = predictor, [0.0] * cfg.n_layers
    mx.eval([p.parameters() for p in predictors if hasattr(p, "parameters")])
    resident_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters())) + sum(
        b.nbytes for b in down_bias if b is not None)
    predictor_bytes = sum(v.nbytes for p in predictors if hasattr(p, "parameters")
                          for _, v in tree_flatten(p.parameters()))
    # a quantized LM head casts its scales and biases to float32 every token (measured on the built-in model)
    head = model.lm_head if "lm_head" in model else getattr(getattr(model, "model", None), "embed_tokens", None)
    head = head if head is not None else model.model.decoder.embed_tokens
    transient = 4 * (head.scales.size + head.biases.size) if "scales" in head else 0
    pl = plan(folder, cfg, resident_bytes, predictor_bytes, dram_budget, window, kv_tokens, slots, recall,
              transient)

    reader = BundleReader(folder, cfg, threads=threads, direct=direct, verify=verify)
    stats = FlashStats(n_layers=cfg.n_layers, d_ff=cfg.d_ff)
    spec = model.ffn_spec
    staging = BundleBuffer(pl.staging_rows, cfg.layout)  # shared: layers run one after another
    scratch = staging.np.reshape(-1)  # row moves happen before a layer's reads, so they can share it
    for l, layer in enumerate(model.layers):
        buf = NeuronBuffer(pl.slots[l], cfg.layout, scratch)
        cache = NeuronCache(cfg.d_ff, pl.slots[l], pl.window, buffer=buf, coalesce_gap=coalesce_gap)
        layer.mlp = FlashFFN(l, spec, cfg.quantization, predictors[l], taus[l], buf, cache, reader, staging,
                             down_bias[l], stats, profile)
    if pl.budget is not None:
        mx.set_cache_limit(0)  # freed MLX buffers go back to the OS instead of counting against the budget
    mx.reset_peak_memory()  # peak memory from here on is flash mode's own
    model.flash_stats = stats
    model.flash_plan = pl
    model.flash_reader = reader

