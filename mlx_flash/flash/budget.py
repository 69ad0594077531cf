"""The DRAM budget of flash mode: where every byte goes, planned before anything big is allocated.

What stays in DRAM (paper Section 3): the resident weights (embeddings,
attention, norms, LM head), the predictors, one fixed buffer of neuron rows
per layer (the neuron window), the reads' staging area, the KV cache for the
context served and the working memory of a prompt chunk. `plan()` adds these
up before anything big is allocated and refuses, in one line, a budget that
cannot hold them.

The context (`max_kv_size`, like mlx-lm's flag) is reserved whole: the KV cache is
allocated once at that size (no growth by concatenation, which would briefly hold
it twice), and prompts plus generated tokens beyond it are refused. Prompts are
processed in chunks of `prefill_step` tokens (mlx-lm's prefill_step_size, set to
match), whose attention scores and activations are the working memory planned. By
default the chunk is the longest (up to the context) that leaves the windows all the
rows they want: each chunk of a long prompt is one pass over every layer's FFN
(flash.prompt), so a longer chunk reads less before the first token; a budget too
tight for 128 tokens gets shorter chunks before it is refused.
"""

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from ..errors import FlashError
from ..format import RESIDENT_FILE, FlashConfig
from ..models.architectures import text_config
from ..sizes import parse_budget
from .bundle_reader import BUFFER_ALIGN
from .predictor import TRAIN_BATCH, numpy_is_faster
from .sparsity import float_block

DEFAULT_THREADS = 32  # the paper's
DEFAULT_MAX_KV_SIZE = 512  # tokens of context (prompt + generated) the budget reserves KV cache for
DEFAULT_PREFILL_STEP = 128  # prompt tokens per forward pass when the budget holds no more
PREFILL_STEPS = (2048, 1024, 512, 256)  # tried first, largest first: a longer chunk is fewer passes over the FFN
SMALLEST_PREFILL_STEP = 16  # what a tight budget may cut the chunk to (more chunks: the prompt runs slower)
UNBUDGETED_PREFILL_STEP = 512  # without a budget: mlx-lm's 2048 would hold ~1 GB of a 7B model's attention scores
SLOT_MARGIN = 1.1  # buffer rows over the calibrated 99th percentile of the window's union


def model_bytes(folder: Path, cfg: FlashConfig) -> int:
    """The model's size: resident weights plus every FFN bundle's content (padding excluded)."""
    return (Path(folder) / RESIDENT_FILE).stat().st_size + cfg.n_layers * cfg.d_ff * cfg.layout.nbytes


@dataclass
class Plan:
    """Where the DRAM budget goes, in bytes."""

    budget: Optional[int]
    model: int
    resident: int
    predictors: int
    kv_cache: int
    working: int
    staging: int  # the reads' staging area (whole bundles), shared by the layers; with prefetch, three
    buffers: int  # the neuron windows: packed fields of `slots` neurons per layer
    pinned_bytes: int  # the outlier neurons kept resident outside the windows (flash.outliers)
    slots: List[int]
    window: int
    staging_rows: int
    max_kv_size: int  # tokens of context reserved
    prefill_step: int  # prompt tokens per forward pass
    pinned: List[List[int]]  # per layer, its pinned neurons

    @property
    def total(self) -> int:
        return (self.resident + self.predictors + self.kv_cache + self.working + self.staging + self.buffers
                + self.pinned_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def kv_bytes(cfg: FlashConfig, tokens: int, item: int = 4) -> int:
    """Keys and values of `tokens` tokens in every layer; item: bytes per element (the activations' dtype)."""
    c = text_config(cfg.model_config)
    heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * heads * head_dim * tokens * item


def staging_rows(cfg: FlashConfig) -> int:
    """Bundles the staging area holds: a decode step's new neurons in one round (2-10% of d_ff
    measured), a sequence's first token in a few."""
    return min(cfg.d_ff, max(64, cfg.d_ff // 4))


def working_bytes(cfg: FlashConfig, transient: int = 0, chunk: int = DEFAULT_PREFILL_STEP,
                  context: int = DEFAULT_MAX_KV_SIZE, item: int = 4, numpy: Optional[int] = None) -> int:
    """Working memory: a token's logits, and a prompt chunk's activations (hidden states, attention
    projections, FFN hidden, predictor scores) and attention scores against the whole context,
    plus what the resident part allocates per token beyond its weights (`transient`), plus the numpy
    matmuls' (`numpy`; None: numpy_prompt_bytes, a dense FFN's)."""
    c = text_config(cfg.model_config)
    heads = c["num_attention_heads"]
    logits = 2 * c["vocab_size"] * 4
    activations = chunk * (8 * cfg.d_model + 5 * cfg.d_ff) * item
    scores = 2 * heads * chunk * context * 4  # scores and their softmax, float32
    numpy = numpy_prompt_bytes(cfg, chunk) if numpy is None else numpy
    return logits + activations + scores + transient + numpy


def numpy_prompt_bytes(cfg: FlashConfig, chunk: int) -> int:
    """On MLX's CPU backend a prompt's matmuls go to numpy (flash.prefill): one resident matrix at a
    time in float32 (a fused QKV at most), or a slice's neuron rows dequantized a block at a time, with
    the chunk's float32 inputs, outputs and hidden units."""
    if not numpy_is_faster():
        return 0
    rows = min(staging_rows(cfg) // 2 or 1, float_block(cfg.d_model, cfg.d_ff))
    weights = max(4 * largest_layer_matrix(cfg), 3 * 4 * cfg.d_model * rows)
    return weights + chunk * (2 * cfg.d_model + 2 * rows) * 4


def numpy_expert_bytes(cfg, d_ff: int, top_k: int, chunk: int) -> int:
    """On MLX's CPU backend a prompt's routed experts multiply in numpy too (flash.expert_numpy): one
    expert's gate, up and down in float32 (or the largest resident matrix, if larger), the chunk's float32
    inputs, the outputs of its (token, expert) pairs twice (numpy's and MLX's copy), and one expert's
    tokens (at most the chunk): their inputs, gate, up and hidden units, outputs. cfg: the model's
    geometry (model_config, d_model); d_ff: an expert's width."""
    if not numpy_is_faster():
        return 0
    d = cfg.d_model
    weights = max(4 * largest_layer_matrix(cfg), 3 * 4 * d * d_ff)
    return weights + chunk * (d + 2 * top_k * d + 2 * d + 3 * d_ff) * 4


def largest_layer_matrix(cfg: FlashConfig) -> int:
    """Elements of the largest matrix a layer multiplies by besides its FFN bundles: an attention
    projection (Phi-3's fused QKV), or a predictor's rank x d_ff."""
    c = text_config(cfg.model_config)
    d, heads = cfg.d_model, c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // heads
    kv = c.get("num_key_value_heads") or heads
    attention = d * (heads + 2 * kv) * head_dim if c.get("model_type") == "phi3" else d * max(heads * head_dim, d)
    ranks = (getattr(cfg, "predictors", None) or {}).get("rank") or [0]  # an MoE plan passes a geometry
    return max(attention, max(ranks) * cfg.d_ff)


def predictor_level(p: dict, recall: Optional[float]) -> dict:
    """The calibration facts at one recall level (tau, predicted_share, window_union_p99 per layer)
    of flash.json's `predictors` entry or of its `lookahead` entry."""
    if recall is None or recall == p["target_recall"]:
        return p
    levels = p.get("recall_levels", {})
    key = next((k for k in levels if abs(float(k) - recall) < 1e-9), None)
    if key is None:
        have = ", ".join(sorted(levels, key=float)) or str(p["target_recall"])
        raise FlashError(f"--recall {recall}: the predictors were calibrated for recall {have}")
    return {**p, **levels[key]}


def plan(folder: Optional[Path], cfg: FlashConfig, resident_bytes: int, predictor_bytes: int, budget=None,
         window: Optional[int] = None, max_kv_size: int = DEFAULT_MAX_KV_SIZE, slots: Optional[int] = None,
         recall: Optional[float] = None, transient: int = 0, prefill_step: Optional[int] = None,
         item: int = 4, prefetch: bool = False, total: Optional[int] = None) -> Plan:
    """transient: what the resident part allocates per token beyond its weights; item: bytes per
    element of the activations and KV cache (see flash.attach.resident_facts); total: the model's
    size when there is no folder yet (an estimate from its config: prepare --estimate);
    prefill_step: None chooses it (the module's docstring)."""
    p = predictor_level(cfg.predictors, recall)
    window = window or p["window"]
    if window < 1:
        raise FlashError("--window must be at least 1")
    if max_kv_size < 1 or (prefill_step is not None and prefill_step < 1):
        raise FlashError("--max-kv-size and --prefill-step must be at least 1")
    total = total or model_bytes(folder, cfg)
    budget_bytes = parse_budget(budget, total)
    chunk = min(prefill_step or DEFAULT_PREFILL_STEP, max_kv_size)
    working = working_bytes(cfg, transient, chunk, max_kv_size, item)
    kv = kv_bytes(cfg, max_kv_size, item)
    row = cfg.layout.field_bytes
    staging = staging_rows(cfg) * cfg.layout.stride * (3 if prefetch else 1)  # prefetch: two more areas
    pinned = cfg.predictors.get("pinned") or [[] for _ in range(cfg.n_layers)]
    # every NeuronBuffer aligns each field array on a page: one page per field, per buffer
    align = len(cfg.layout.fields) * BUFFER_ALIGN
    pinned_bytes = sum(map(len, pinned)) * row + sum(1 for p in pinned if p) * align

    if slots is not None:
        wanted = [min(cfg.d_ff, slots)] * cfg.n_layers
    else:
        # the calibrated union of a window of `window` tokens, scaled when another window is asked for
        base = p["window_union_p99"] if window == p["window"] else [
            min(cfg.d_ff, share * cfg.d_ff * window) for share in p["predicted_share"]]
        wanted = [min(cfg.d_ff, int(math.ceil(SLOT_MARGIN * b)) + 8) for b in base]
    # a token's own predicted set must fit, or the window degenerates into truncation
    floor = [min(w, int(math.ceil(share * cfg.d_ff * 1.2)) + 8) for w, share in zip(wanted, p["predicted_share"])]
    fixed = resident_bytes + predictor_bytes + kv + working + staging + pinned_bytes
    if prefill_step is None:  # the longest chunk that leaves the windows every row they want
        windows = sum(wanted) * row + cfg.n_layers * align
        for c in [min(c, max_kv_size) for c in PREFILL_STEPS if min(c, max_kv_size) > chunk]:
            more = working_bytes(cfg, transient, c, max_kv_size, item) - working
            fits = c <= UNBUDGETED_PREFILL_STEP if budget_bytes is None else \
                fixed + more + windows <= budget_bytes
            if fits:
                chunk, working, fixed = c, working + more, fixed + more
                break
    if budget_bytes is not None:
        need = sum(floor) * row + cfg.n_layers * align
        if prefill_step is None:  # a tight budget: shorter chunks, down to SMALLEST_PREFILL_STEP, before refusing
            for c in (c for c in (64, 32, SMALLEST_PREFILL_STEP) if c < chunk):
                if budget_bytes - fixed >= need:
                    break
                less = working - working_bytes(cfg, transient, c, max_kv_size, item)
                chunk, working, fixed = c, working - less, fixed - less
        room = budget_bytes - fixed
        if room < need:
            raise FlashError(
                f"a DRAM budget of {budget_bytes / 1e6:.1f} MB cannot hold this model in flash mode: resident "
                f"weights {resident_bytes / 1e6:.1f} MB + predictors {predictor_bytes / 1e6:.1f} MB + KV cache "
                f"({max_kv_size} tokens) {kv / 1e6:.1f} MB + working {working / 1e6:.1f} MB + read staging "
                f"{staging / 1e6:.1f} MB + pinned neurons {pinned_bytes / 1e6:.2f} MB, plus at least "
                f"{need / 1e6:.1f} MB of neuron windows, need {(fixed + need) / 1e6:.1f} MB "
                f"({(fixed + need) / total:.0%} of the model's {total / 1e6:.1f} MB)"
            )
        # every layer gets its floor, then the same share of what it wants beyond it
        extra = sum(w - f for w, f in zip(wanted, floor)) * row
        scale = min(1.0, (room - need) / extra) if extra else 1.0
        wanted = [f + int((w - f) * scale) for w, f in zip(wanted, floor)]
    buffers = sum(wanted) * row + cfg.n_layers * align
    return Plan(budget_bytes, total, resident_bytes, predictor_bytes, kv, working, staging, buffers, pinned_bytes,
                wanted, window, staging_rows(cfg), max_kv_size, chunk, pinned)


# MARK: - preparing a model within a budget (convert, calibration)


@contextmanager
def returning_freed_memory(active: bool = True):
    """Within: MLX hands freed buffers back to the OS instead of keeping them for reuse, so that a
    command working layer by layer stays within its budget (the previous cache limit is restored)."""
    previous = mx.set_cache_limit(0) if active else None
    try:
        yield
    finally:
        if previous is not None:
            mx.set_cache_limit(previous)


def check_prepare(what: str, budget, total: int, parts: Dict[str, int], hint: str = "") -> Optional[int]:
    """The budget in bytes (None when none is given) once it is checked to hold `parts`, what a
    command holds at once; otherwise one line that says where the bytes go."""
    budget_bytes = parse_budget(budget, total)
    need = sum(parts.values())
    if budget_bytes is not None and need > budget_bytes:
        items = " + ".join(f"{k} {v / 1e6:.1f} MB" for k, v in parts.items())
        raise FlashError(f"a DRAM budget of {budget_bytes / 1e6:.1f} MB cannot {what}: {items} need "
                         f"{need / 1e6:.1f} MB ({need / total:.0%} of the model's {total / 1e6:.1f} MB){hint}")
    return budget_bytes


CALIBRATION_CHUNK = 256  # tokens whose FFN activations are computed at once during calibration


def calibration_token_bytes(cfg: FlashConfig, seq_len: int) -> int:
    """What calibration holds per calibration token while it works on one layer: the hidden states,
    the attention's intermediates and scores over the token's sequence, this and the previous layer's
    FFN inputs in float16, and per neuron |h| in float16, its active mask, the threshold's float32
    copies (or the float32 targets of predictor training, and their mirror in MLX), and the float32
    contributions |h| * ||down|| with the loss weights made from them (numpy and MLX)."""
    heads = text_config(cfg.model_config).get("num_attention_heads", 1)
    return cfg.d_model * (8 * 4 + 2 * 2) + heads * seq_len * 4 * 3 + cfg.d_ff * 32


def calibration_parts(cfg: FlashConfig, resident: int, ranks: List[int], tokens: int, seq_len: int) -> dict:
    """What calibration holds at once, by part, for `tokens` calibration tokens (the constants were
    measured on a 12-layer Llama with d_ff 8192: 128 and 1024 tokens, within 7% and 1%)."""
    predictors = sum(2 * (r * cfg.d_model + cfg.d_ff * r + cfg.d_ff) for r in ranks)  # float16 once trained
    layer = 2 * cfg.d_ff * cfg.layout.stride  # its bundles, and their fields copied packed
    # one at a time: a chunk's FFN (gate, up, h in float32), a training step's scores, loss and
    # gradients, or one sequence's predicted sets and their running counts (window sizes)
    working = cfg.d_ff * max(CALIBRATION_CHUNK * 4 * 3, min(tokens, TRAIN_BATCH) * 4 * 8, seq_len * 17)
    if numpy_is_faster():  # the numpy pass (sparsity.record_layers): a block of the layer's rows in float32,
        layer += 3 * 4 * cfg.d_model * float_block(cfg.d_model, cfg.d_ff)
        working = max(working, 3 * 4 * cfg.d_model ** 2)  # or an attention matrix (fused QKV at most)
    return {"resident weights": resident, "predictors": predictors, "one FFN layer": layer, "working memory": working,
            f"activations of {tokens} tokens": tokens * calibration_token_bytes(cfg, seq_len)}


def calibration_tokens(folder: Path, cfg: FlashConfig, ranks: List[int], tokens: Optional[int], default: int,
                       seq_len: int, budget=None) -> int:
    """The calibration tokens: `tokens` if given (refused if the budget cannot hold them), else `default`,
    or as many whole sequences as the budget leaves room for when that is fewer."""
    resident = (Path(folder) / RESIDENT_FILE).stat().st_size
    total = model_bytes(folder, cfg)
    budget_bytes = parse_budget(budget, total)
    wanted = tokens or default
    if budget_bytes is None:
        return wanted
    need = lambda t: sum(calibration_parts(cfg, resident, ranks, t, seq_len).values())
    lo, hi = 0, wanted // seq_len  # whole sequences; need() grows with them
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid * seq_len) <= budget_bytes else (lo, mid - 1)
    fit = lo * seq_len
    if tokens is None and seq_len <= fit < wanted:
        wanted = fit
    hint = f"; at most {fit} tokens fit: pass --tokens {fit}" if tokens and fit >= seq_len else ""
    check_prepare("calibrate this model", budget, total, calibration_parts(cfg, resident, ranks, wanted, seq_len),
                  hint)
    return wanted
