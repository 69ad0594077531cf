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
match), whose attention scores and activations are the working memory planned.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import FlashError
from ..format import RESIDENT_FILE, FlashConfig
from ..sizes import parse_budget

DEFAULT_THREADS = 32  # the paper's
DEFAULT_MAX_KV_SIZE = 512  # tokens of context (prompt + generated) the budget reserves KV cache for
DEFAULT_PREFILL_STEP = 128  # prompt tokens per forward pass (mlx-lm's default 2048 would need 16x the memory)
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
    staging: int  # the reads' staging area (whole bundles), shared by the layers
    buffers: int  # the neuron windows: packed fields of `slots` neurons per layer
    slots: List[int]
    window: int
    staging_rows: int
    max_kv_size: int  # tokens of context reserved
    prefill_step: int  # prompt tokens per forward pass

    @property
    def total(self) -> int:
        return self.resident + self.predictors + self.kv_cache + self.working + self.staging + self.buffers

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def kv_bytes(cfg: FlashConfig, tokens: int, item: int = 4) -> int:
    """Keys and values of `tokens` tokens in every layer; item: bytes per element (the activations' dtype)."""
    c = cfg.model_config
    heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * heads * head_dim * tokens * item


def staging_rows(cfg: FlashConfig) -> int:
    """Bundles the staging area holds: a decode step's new neurons in one round (2-10% of d_ff
    measured), a sequence's first token in a few."""
    return min(cfg.d_ff, max(64, cfg.d_ff // 4))


def working_bytes(cfg: FlashConfig, transient: int = 0, chunk: int = DEFAULT_PREFILL_STEP,
                  context: int = DEFAULT_MAX_KV_SIZE, item: int = 4) -> int:
    """Working memory: a token's logits, and a prompt chunk's activations (hidden states, attention
    projections, FFN hidden, predictor scores) and attention scores against the whole context,
    plus what the resident part allocates per token beyond its weights (`transient`)."""
    c = cfg.model_config
    heads = c["num_attention_heads"]
    logits = 2 * c["vocab_size"] * 4
    activations = chunk * (8 * cfg.d_model + 5 * cfg.d_ff) * item
    scores = 2 * heads * chunk * context * 4  # scores and their softmax, float32
    return logits + activations + scores + transient


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
         window: Optional[int] = None, max_kv_size: int = DEFAULT_MAX_KV_SIZE, slots: Optional[int] = None,
         recall: Optional[float] = None, transient: int = 0, prefill_step: int = DEFAULT_PREFILL_STEP,
         item: int = 4) -> Plan:
    """transient: what the resident part allocates per token beyond its weights; item: bytes per
    element of the activations and KV cache (see flash.attach.resident_facts)."""
    p = predictor_level(cfg, recall)
    window = window or p["window"]
    if window < 1:
        raise FlashError("--window must be at least 1")
    if max_kv_size < 1 or prefill_step < 1:
        raise FlashError("--max-kv-size and --prefill-step must be at least 1")
    total = model_bytes(folder, cfg)
    budget_bytes = parse_budget(budget, total)
    chunk = min(prefill_step, max_kv_size)
    working = working_bytes(cfg, transient, chunk, max_kv_size, item)
    kv = kv_bytes(cfg, max_kv_size, item)
    row = cfg.layout.field_bytes
    staging = staging_rows(cfg) * cfg.layout.stride

    if slots is not None:
        wanted = [min(cfg.d_ff, slots)] * cfg.n_layers
    else:
        # the calibrated union of a window of `window` tokens, scaled when another window is asked for
        base = p["window_union_p99"] if window == p["window"] else [
            min(cfg.d_ff, share * cfg.d_ff * window) for share in p["predicted_share"]]
        wanted = [min(cfg.d_ff, int(math.ceil(SLOT_MARGIN * b)) + 8) for b in base]
    # a token's own predicted set must fit, or the window degenerates into truncation
    floor = [min(w, int(math.ceil(share * cfg.d_ff * 1.2)) + 8) for w, share in zip(wanted, p["predicted_share"])]
    fixed = resident_bytes + predictor_bytes + kv + working + staging
    if budget_bytes is not None:
        room = budget_bytes - fixed
        need = sum(floor) * row
        if room < need:
            raise FlashError(
                f"a DRAM budget of {budget_bytes / 1e6:.1f} MB cannot hold this model in flash mode: resident "
                f"weights {resident_bytes / 1e6:.1f} MB + predictors {predictor_bytes / 1e6:.1f} MB + KV cache "
                f"({max_kv_size} tokens) {kv / 1e6:.1f} MB + working {working / 1e6:.1f} MB + read staging "
                f"{staging / 1e6:.1f} MB, plus at least "
                f"{need / 1e6:.1f} MB of neuron windows, need {(fixed + need) / 1e6:.1f} MB "
                f"({(fixed + need) / total:.0%} of the model's {total / 1e6:.1f} MB)"
            )
        # every layer gets its floor, then the same share of what it wants beyond it
        extra = sum(w - f for w, f in zip(wanted, floor)) * row
        scale = min(1.0, (room - need) / extra) if extra else 1.0
        wanted = [f + int((w - f) * scale) for w, f in zip(wanted, floor)]
    buffers = sum(wanted) * row
    return Plan(budget_bytes, total, resident_bytes, predictor_bytes, kv, working, staging, buffers, wanted, window,
                staging_rows(cfg), max_kv_size, chunk)
