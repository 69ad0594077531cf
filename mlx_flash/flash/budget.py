"""Flash mode: size the neuron windows to a DRAM budget and attach a FlashFFN to every layer.

What stays in DRAM (paper Section 3): the resident weights (embeddings,
attention, norms, LM head), the predictors, one fixed buffer of bundle rows
per layer (the neuron window), the KV cache and working memory. `plan()` adds
these up before anything big is allocated and refuses, in one line, a budget
that cannot hold them.
"""

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .bundle_reader import BundleBuffer, BundleReader
from ..errors import FlashError
from .ffn import FlashFFN, FlashStats
from ..format import RESIDENT_FILE, FlashConfig
from .neuron_cache import NeuronCache
from .predictor import load_predictors

DEFAULT_THREADS = 32  # the paper's
DEFAULT_KV_TOKENS = 512  # context the budget reserves KV cache for (prompt + generated tokens)
SLOT_MARGIN = 1.1  # buffer rows over the calibrated 99th percentile of the window's union
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?|%)?\s*$", re.I)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def model_bytes(folder: Path, cfg: FlashConfig) -> int:
    """The model's size: resident weights plus every FFN bundle's content (padding excluded)."""
    return (Path(folder) / RESIDENT_FILE).stat().st_size + cfg.n_layers * cfg.d_ff * cfg.layout.nbytes


def parse_budget(budget, total: int) -> Optional[int]:
    """Bytes ('150M', '1.5G', '2GiB', 123456) or a share of the model's size (0.5, '120%')."""
    if budget is None:
        return None
    m = _SIZE.match(str(budget))
    if not m:
        raise FlashError(f"--dram-budget '{budget}' is not a size (e.g. 60M, 1.5G) or a share (e.g. 0.6, 120%)")
    value, unit = float(m.group(1)), (m.group(2) or "").lower().rstrip("b")
    if unit == "%":
        return int(value / 100 * total)
    if not unit and value <= 1.0:
        return int(value * total)
    return int(value * _UNITS[unit])


@dataclass
class Plan:
    """Where the DRAM budget goes, in bytes."""

    budget: Optional[int]
    model: int
    resident: int
    predictors: int
    kv_cache: int
    working: int
    buffers: int
    slots: List[int]
    window: int

    @property
    def total(self) -> int:
        return self.resident + self.predictors + self.kv_cache + self.working + self.buffers

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def kv_bytes(cfg: FlashConfig, tokens: int) -> int:
    c = cfg.model_config
    heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    item = 4 if cfg.dtype == "float32" else 2  # keys and values take the activations' dtype
    return c["num_hidden_layers"] * 2 * heads * head_dim * tokens * item


def predictor_level(cfg: FlashConfig, recall: Optional[float]) -> dict:
    """The calibration facts at one recall level: tau, predicted_share, window_union_p99 per layer."""
    p = cfg.predictors
    if recall is None or recall == p["target_recall"]:
        return p
    levels = p.get("recall_levels", {})
    key = next((k for k in levels if abs(float(k) - recall) < 1e-9), None)
    if key is None:
        have = ", ".join(sorted(levels, key=float)) or str(p["target_recall"])
        raise FlashError(f"--recall {recall}: the predictors were calibrated for recall {have}")
    return {**p, **levels[key]}


def plan(folder: Path, cfg: FlashConfig, resident_bytes: int, predictor_bytes: int, budget=None,
         window: Optional[int] = None, kv_tokens: int = DEFAULT_KV_TOKENS, slots: Optional[int] = None,
         recall: Optional[float] = None, transient: int = 0) -> Plan:
    """transient: what the resident part allocates per token beyond its weights (see attach_flash)."""
    p = predictor_level(cfg, recall)
    window = window or p["window"]
    if window < 1:
        raise FlashError("--window must be at least 1")
    total = model_bytes(folder, cfg)
    budget_bytes = parse_budget(budget, total)
    # working memory: logits of a token and a prompt chunk's activations
    vocab = cfg.model_config["vocab_size"]
    working = 2 * vocab * 4 + 64 * cfg.d_ff * 4 * 4 + transient
    kv = kv_bytes(cfg, kv_tokens)
    stride = cfg.layout.stride

    if slots is not None:
        wanted = [min(cfg.d_ff, slots)] * cfg.n_layers
    else:
        # the calibrated union of a window of `window` tokens, scaled when another window is asked for
        base = p["window_union_p99"] if window == p["window"] else [
            min(cfg.d_ff, share * cfg.d_ff * window) for share in p["predicted_share"]]
        wanted = [min(cfg.d_ff, int(math.ceil(SLOT_MARGIN * b)) + 8) for b in base]
    # a token's own predicted set must fit, or the window degenerates into truncation
    floor = [min(w, int(math.ceil(share * cfg.d_ff * 1.2)) + 8) for w, share in zip(wanted, p["predicted_share"])]
    fixed = resident_bytes + predictor_bytes + kv + working
    if budget_bytes is not None:
        room = budget_bytes - fixed
        need = sum(floor) * stride
        if room < need:
            raise FlashError(
                f"a DRAM budget of {budget_bytes / 1e6:.1f} MB cannot hold this model in flash mode: resident "
                f"weights {resident_bytes / 1e6:.1f} MB + predictors {predictor_bytes / 1e6:.1f} MB + KV cache "
                f"({kv_tokens} tokens) {kv / 1e6:.1f} MB + working {working / 1e6:.1f} MB, plus at least "
                f"{need / 1e6:.1f} MB of neuron windows, need {(fixed + need) / 1e6:.1f} MB "
                f"({(fixed + need) / total:.0%} of the model's {total / 1e6:.1f} MB)"
            )
        # every layer gets its floor, then the same share of what it wants beyond it
        extra = sum(w - f for w, f in zip(wanted, floor)) * stride
        scale = min(1.0, (room - need) / extra) if extra else 1.0
        wanted = [f + int((w - f) * scale) for w, f in zip(wanted, floor)]
    buffers = sum(wanted) * stride
    return Plan(budget_bytes, total, resident_bytes, predictor_bytes, kv, working, buffers, wanted, window)


def attach_flash(model, folder: Path, cfg: FlashConfig, down_bias, dram_budget=None, window=None,
                 threads: int = DEFAULT_THREADS, coalesce_gap: int = 0, direct: bool = True, verify: bool = True,
                 kv_tokens: int = DEFAULT_KV_TOKENS, slots: Optional[int] = None, predictor=None,
                 recall: Optional[float] = None, predictor_bits: Optional[int] = 8):
    """Give every layer a FlashFFN. predictor: None (the trained ones) or a list of callables
    (N, d_model) -> (N, d_ff) scores with threshold 0 (an oracle, in tests and evaluation).
    recall: one of the calibrated recall levels (default: the training target).
    predictor_bits: quantize the predictors to this many bits in memory (None: float16, as stored)."""
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

    reader = BundleReader(folder, cfg, threads=threads, direct=direct, coalesce_gap=coalesce_gap, verify=verify)
    stats = FlashStats(n_layers=cfg.n_layers, d_ff=cfg.d_ff)
    spec = model.ffn_spec
    for l, layer in enumerate(model.layers):
        buf = BundleBuffer(pl.slots[l], cfg.layout)
        cache = NeuronCache(cfg.d_ff, pl.slots[l], pl.window, rows=buf.np)
        layer.mlp = FlashFFN(l, spec, cfg.quantization, predictors[l], taus[l], buf, cache, reader,
                             down_bias[l], stats)
    if pl.budget is not None:
        mx.set_cache_limit(0)  # freed MLX buffers go back to the OS instead of counting against the budget
    mx.reset_peak_memory()  # peak memory from here on is flash mode's own
    model.flash_stats = stats
    model.flash_plan = pl
    model.flash_reader = reader

