"""The MoE benchmark's synthetic model and routing (bench/moe.py): real geometry, random weights, and a
routing process whose locality is a flag.

- `write_model`: a flash folder as convert_experts writes it (flash.json, resident.safetensors,
  experts.bundles with CRCs) at a real model's geometry (Qwen3-30B-A3B, gpt-oss-20b) with fewer layers and
  the vocabulary cut in the same proportion, random 4-bit weights (group 64, float16 scales).
- `Routing`: each token's top-k experts per MoE layer drawn with `reuse` of them from the previous token's,
  up to `recent` within the last RECENT_TOKENS tokens, the rest by popularity (`skew`).
- `SyntheticRouter`: the layer's own router (its cost is real), its top-k steered to the process's experts;
  `SyntheticLookahead`: layer l's guess of the next MoE layer's experts, right with probability `hit`.
"""

import os
import shutil
import zlib
from collections import deque
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..expert_format import EXPERTS_FILE, ExpertStore, expert_layout
from ..format import PAGE, RESIDENT_FILE, round_up
from ..models.architectures import architecture, moe_blocks

RECENT_TOKENS = 8  # the window of --recent

# full models' geometry (config.json keys); layers and vocabulary are cut by --layers
GEOMETRIES = {
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                      "num_experts_per_tok": 8, "moe_intermediate_size": 768, "intermediate_size": 6144,
                      "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                      "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                      "tie_word_embeddings": False, "max_position_embeddings": 40960},
    "gpt-oss-20b": {"model_type": "gpt_oss", "hidden_size": 2880, "num_hidden_layers": 24,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32,
                    "num_experts_per_tok": 4, "intermediate_size": 2880, "vocab_size": 201088,
                    "sliding_window": 128, "rms_norm_eps": 1e-5, "rope_theta": 150000},
    # a tiny one, for tests
    "tiny": {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "num_experts": 16, "num_experts_per_tok": 2,
             "moe_intermediate_size": 64, "intermediate_size": 128, "decoder_sparse_step": 1, "mlp_only_layers": [],
             "norm_topk_prob": True, "vocab_size": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "max_position_embeddings": 256},
}
QUANT = {"group_size": 64, "bits": 4}


def synthetic_config(geometry: str, layers: int) -> dict:
    g = dict(GEOMETRIES[geometry])
    full = g["num_hidden_layers"]
    layers = min(layers, full)
    vocab = max(256, round(g["vocab_size"] * layers / full / 256) * 256)  # the embeddings' share stays the model's
    if g["model_type"] == "gpt_oss":
        g["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return {**g, "num_hidden_layers": layers, "vocab_size": vocab, "quantization": dict(QUANT)}


# MARK: - the synthetic model


def write_model(folder: Path, geometry: str, layers: int, seed: int = 0, quiet: bool = False) -> Path:
    """A flash folder as convert_experts writes it, with random 4-bit weights: resident part quantized as
    `convert --quantize 4` (routers float), every expert's extent random bits with sane scales and a CRC."""
    from tqdm import tqdm

    from ..sources import instantiate

    config = synthetic_config(geometry, layers)
    moe = architecture(config).moe
    mx.random.seed(seed)
    model = instantiate(config)
    blocks = moe_blocks(model)
    switch = getattr(blocks[0], moe.switch)
    for b in blocks.values():
        setattr(b, moe.switch, nn.Module())
    routers = {f"model.layers.{l}.{moe.block}.{moe.router}" for l in blocks}
    nn.quantize(model, QUANT["group_size"], QUANT["bits"],
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and p not in routers)
    fields = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out_dim, in_dim = getattr(switch, proj).weight.shape[1:]  # lazy: never computed
        e = getattr(switch, proj).weight.shape[0]
        fields[f"{proj}.weight"] = mx.zeros((e, out_dim, in_dim * QUANT["bits"] // 32), mx.uint32)
        for part in ("scales", "biases"):
            fields[f"{proj}.{part}"] = mx.zeros((e, out_dim, in_dim // QUANT["group_size"]), mx.float16)
        if "bias" in getattr(switch, proj):
            fields[f"{proj}.bias"] = mx.zeros((e, out_dim), mx.float16)
    layout = expert_layout(fields, PAGE)
    experts = fields["gate_proj.weight"].shape[0]
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mx.save_safetensors(str(tmp / RESIDENT_FILE), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx-flash"})
        rng = np.random.default_rng(seed)
        offsets, offset = [None] * layers, 0
        with open(tmp / EXPERTS_FILE, "wb") as f:
            for l in tqdm(sorted(blocks), desc="writing synthetic experts", unit="layer", disable=quiet):
                data = np.frombuffer(rng.bytes(experts * layout.stride), np.uint8).copy()
                data = data.reshape(experts, layout.stride)  # (experts, stride): one extent per row
                for fld in layout.fields:
                    if fld.dtype == "float16":  # scales ~ 1 / sqrt(fan_in) / 4.6, biases centre 4-bit codes at 0
                        n = int(np.prod(fld.shape))
                        fan_in = fld.shape[-1] * QUANT["group_size"] if len(fld.shape) > 1 else 1
                        value = 0.0 if fld.name.endswith(".bias") else 1.0 / np.sqrt(fan_in) / 4.6
                        value *= -7.5 if fld.name.endswith(".biases") else 1.0
                        data[:, fld.offset : fld.offset + 2 * n] = np.full(n, value, np.float16).view(np.uint8)
                crcs = [zlib.crc32(row) & 0xFFFFFFFF for row in data[:, : layout.nbytes]]
                data[:, layout.crc_offset :] = np.array(crcs, dtype="<u4").view(np.uint8).reshape(experts, 4)
                f.seek(offset)
                f.write(data)
                offsets[l] = {"offset": offset, "nbytes": data.nbytes, "sha256": ""}
                offset = round_up(offset + data.nbytes, PAGE)
            f.truncate(offset)
        d_model, d_ff = config["hidden_size"], getattr(switch, "gate_proj").weight.shape[1]
        ExpertStore(config["model_type"], config, d_model, d_ff, experts, config["num_experts_per_tok"], dict(QUANT),
                    "float16", layout, offsets, offset, {"model": f"SYNTHETIC {geometry}, random weights"}).save(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# MARK: - routing from a process whose locality is a flag


class Routing:
    """Each token's top-k experts per MoE layer: `reuse` of them from the previous token's, up to `recent`
    from the tokens before it (within RECENT_TOKENS), the rest among the others by popularity (`skew`). `advance(n)`
    draws n tokens for every MoE layer; `current[l]` is (n, k)."""

    def __init__(self, layers: List[int], experts: int, k: int, reuse: float, recent: float, skew: float = 0.0,
                 seed: int = 0):
        self.layers, self.experts, self.k = layers, experts, k
        self.reuse, self.older = reuse, (recent - reuse) / (1 - reuse) if reuse < 1 else 0.0
        self.rng = np.random.default_rng(seed)
        # expert popularity per layer: p ~ 1 / rank^skew over a random order (0: uniform)
        ranks = {l: self.rng.permutation(experts) + 1 for l in layers}
        self.popularity = {l: ranks[l].astype(np.float64) ** -skew for l in layers}
        self.history = {l: deque(maxlen=RECENT_TOKENS) for l in layers}
        self.current: Dict[int, np.ndarray] = {}
        self.realized = {"tokens": 0, "from_previous": 0, "within_8": 0}

    def _draw(self, l: int) -> np.ndarray:
        hist, k, rng = self.history[l], self.k, self.rng
        prev = hist[-1] if hist else np.array([], np.int64)
        older = np.setdiff1d(np.concatenate(list(hist)[:-1]) if len(hist) > 1 else prev[:0], prev)
        chosen = rng.choice(prev, min(rng.binomial(k, self.reuse), len(prev)), replace=False) if len(prev) else prev
        more = min(rng.binomial(k - len(chosen), self.older), len(older))
        chosen = np.concatenate([chosen, rng.choice(older, more, replace=False) if more else older[:0]])
        others = np.setdiff1d(np.arange(self.experts), np.concatenate([prev, older]))
        if len(others) < k - len(chosen):
            others = np.setdiff1d(np.arange(self.experts), chosen)
        weights = self.popularity[l][others]
        chosen = np.concatenate([chosen, rng.choice(others, k - len(chosen), replace=False,
                                                    p=weights / weights.sum())]).astype(np.int64)
        if hist:  # realized locality, for the report
            self.realized["from_previous"] += len(np.intersect1d(chosen, prev))
            self.realized["within_8"] += len(np.intersect1d(chosen, np.concatenate(list(hist))))
        hist.append(chosen)
        return chosen

    def advance(self, n: int):
        drawn = {l: [] for l in self.layers}
        for _ in range(n):
            for l in self.layers:
                drawn[l].append(self._draw(l))
            self.realized["tokens"] += 1
        self.current = {l: np.stack(v) for l, v in drawn.items()}

    def summary(self) -> dict:
        n = max((self.realized["tokens"] - 1) * len(self.layers) * self.k, 1)
        return {"from_previous": self.realized["from_previous"] / n, "within_8": self.realized["within_8"] / n}


def _bonus(sets: np.ndarray, experts: int) -> mx.array:
    """(n, experts) float32: a large logit on each row's chosen experts, so that top-k picks exactly them."""
    b = np.zeros((len(sets), experts), np.float32)
    np.put_along_axis(b, sets, 1e4, axis=1)
    return mx.array(b)


class SyntheticRouter(nn.Module):
    """The layer's own router (its cost is real), its top-k steered to the routing process's experts. The
    first MoE layer's router draws the forward pass's tokens."""

    def __init__(self, layer: int, router: nn.Module, routing: Routing, first: bool):
        super().__init__()
        self.layer, self.router, self.routing, self.first = layer, router, routing, first
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.router(x)  # (..., experts)
        if self.first:
            self.routing.advance(int(np.prod(x.shape[:-1])))
        bonus = _bonus(self.routing.current[self.layer], self.routing.experts)
        return logits + bonus.reshape(logits.shape)


class SyntheticLookahead(nn.Module):
    """Layer l's guess of the next MoE layer's experts: each of them named with probability `hit`, and
    as many wrong ones as it missed (what the next router applied to this input would give)."""

    def __init__(self, layer: int, router: nn.Module, routing: Routing, hit: float, seed: int = 0):
        super().__init__()
        self.layer, self.router, self.routing, self.hit = layer, router, routing, hit
        self.rng = np.random.default_rng(seed + 7919 * layer)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        logits = self.router(x)
        true = self.routing.current[self.layer][-1]
        named = true[self.rng.random(len(true)) < self.hit]
        wrong = self.rng.choice(np.setdiff1d(np.arange(self.routing.experts), true), len(true) - len(named),
                                replace=False)
        return logits + _bonus(np.concatenate([named, wrong])[None], self.routing.experts)
