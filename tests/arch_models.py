"""Tiny random checkpoints of the architectures mlx-lm implements, in the layout the Hub ships them.

    folder = make_arch(tmp / "qwen3", "qwen3")                        # float32, one model.safetensors
    q4 = make_arch(tmp / "qwen3-q4", "qwen3", quantized=True)         # mlx-community style, 4 bits, group 32
    mixed = make_arch(tmp / "q-mixed", "llama", quantized=True, quant_predicate="mixed_3_6")
    bf16 = make_arch(tmp / "gemma", "gemma3_text", dtype="bfloat16", shards=2)   # two shards + index
    relu = make_arch(tmp / "prosparse", "fatrelu")                    # a ReLU-family Llama
    ref = reference_logits(folder, [1, 5, 9])                          # mlx-lm's own forward pass

Each float folder holds config.json (the keys Hugging Face writes for that model_type),
generation_config.json, model.safetensors (or shards and model.safetensors.index.json)
with the checkpoint's tensor names, and a byte-level BPE tokenizer with a ChatML template
(tests/tiny_models.py). The weights are drawn by building mlx-lm's own class for the config
(`mlx_lm.utils._get_classes`) and redrawing each of its parameters, sorted by name, from
numpy's default_rng(seed): the same seed gives the same weights whatever the dtype or sharding.
For these architectures mlx-lm's parameter names are the Hub's (its `sanitize` only drops
`lm_head.weight` when tied and rotary buffers), so `mlx_lm.utils.load_model` reads the folder
back unchanged.

Scales: linear weights ~ N(0, 1/fan_in) (Granite's o/down projections times 2 / its
residual_multiplier); norm gains at their neutral value + N(0, .05) (Gemma's RMSNorm multiplies
by 1 + w, so there neutral is 0); embeddings and the LM head ~ N(0, 4/d), except where an
embedding multiplier would make the input token dominate (_EMBED_STD): logits vary by token
and position (std ~2; Gemma ~0.5, Granite ~0.04) and their argmax is not simply the input.

quantized=True runs mlx-lm's own converter (`mlx_lm.convert.convert`, as
`python -m mlx_lm convert -q` does) on a float folder written beside the target
(`<folder>.float`): group sizes 32/64, per-module overrides through `quant_predicate`
(an mlx-lm recipe name such as "mixed_3_6", or a callable (path, module) -> bool | dict).

The ReLU family (RELU_FAMILY) are Llama/Mistral checkpoints whose config names another
activation, and for ProSparse and TurboSparse another (remote-code) model_type; TurboSparse's
also carry predictor tensors inside each MLP. mlx-lm's Llama MLP applies SiLU whatever
`hidden_act` says, so `reference_model` builds the base architecture's class and swaps in an
MLP with the checkpoint's activation (RELU_ACTIVATIONS, the published definitions). mlx-lm
cannot convert the remote-code types: their quantized variants are the base type quantized by
mlx-lm with the family's config keys put back, as a user would make one.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import write_tokenizer  # noqa: E402

__all__ = ["ARCHS", "RELU_FAMILY", "RELU_ACTIVATIONS", "QUANT_VARIANTS", "arch_config", "family", "make_arch",
           "mlx_classes", "reference_model", "reference_logits"]

# The architectures mlx-flash builds with mlx-lm's classes (OPT, which mlx-lm lacks, is tested elsewhere).
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "phi3", "olmo2", "granite"]

# ReLU-family checkpoints: name -> (base architecture, whose mlx-lm class holds the weights; config keys
# that select the activation). The config spellings live here and only here.
FATRELU_THRESHOLD = 0.01
RELU_FAMILY = {
    # SparseLLM/ReluLLaMA-7B: a Llama with ReLU on the gate
    "relu": ("llama", {"hidden_act": "relu"}),
    # SparseLLM/prosparse-llama-2-7b: FATReLU, x if x >= threshold else 0, on the gate; its config.json
    # says model_type "sparsellama", architectures ["SparseLlamaForCausalLM"] (remote code)
    "fatrelu": ("llama", {"model_type": "sparsellama", "architectures": ["SparseLlamaForCausalLM"],
                          "hidden_act": "fatrelu", "hidden_act_param": FATRELU_THRESHOLD}),
    # PowerInfer/TurboSparse-Mistral-Instruct, Bamboo-base-v0_1: dReLU, ReLU on both the gate and the up
    # projection; their config.json says model_type "bamboo", architectures ["BambooForCausalLM"],
    # hidden_act "relu" (the second ReLU is in the remote code only)
    "drelu": ("mistral", {"model_type": "bamboo", "architectures": ["BambooForCausalLM"], "hidden_act": "relu"}),
}
# TurboSparse ships its low-rank activation predictors inside each MLP: tensors that are not the model's
SHIPPED_PREDICTOR = "mlp.predictor."
SHIPPED_PREDICTOR_RANK = 16

# (gate activation, up activation or None) of each ReLU-family member, for the reference.
RELU_ACTIVATIONS = {
    "relu": (nn.relu, None),
    "fatrelu": (lambda x: mx.where(x >= FATRELU_THRESHOLD, x, 0), None),
    "drelu": (nn.relu, nn.relu),
}

# Quantized variants of a checkpoint: make_arch(..., quantized=True, **QUANT_VARIANTS[name]).
QUANT_VARIANTS = {
    "q4": dict(bits=4, group_size=32),
    "q4g64": dict(bits=4, group_size=64),
    # mlx-lm's mixed recipe (llama.cpp's Q4_K_M-like): 3 bits, the last layer's v/down and lm_head at 6
    "mixed_3_6": dict(bits=3, group_size=32, quant_predicate="mixed_3_6"),
    # a per-module override written in config.json: layer 0's down projection at 8 bits
    "down0_8bit": dict(bits=4, group_size=32, quant_predicate=lambda path, _: (
        {"group_size": 32, "bits": 8} if path == "model.layers.0.mlp.down_proj" else True)),
    # what mlx-community ships most: a bfloat16 source at mlx-lm's defaults (4 bits, group 64)
    "q4_bf16": dict(bits=4, group_size=64, dtype="bfloat16"),
}

VOCAB = 512  # write_tokenizer's default: 3 specials + 256 bytes + merges + 2 chat specials
BOS, EOS = 1, 2  # write_tokenizer(kind="llama"): <s>, </s>

# tiny geometry shared by every architecture
GEOMETRY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256)


def _common(architecture: str, model_type: str, **kw) -> dict:
    cfg = {"architectures": [architecture], "model_type": model_type, **GEOMETRY,
           "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
           "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": BOS, "eos_token_id": EOS,
           "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "float32"}
    cfg.update(kw)
    return cfg


def arch_config(arch: str) -> dict:
    """config.json of a tiny checkpoint of `arch` (an ARCHS name or a RELU_FAMILY name), with the keys
    the Hub's configs of that model_type carry (transformers 4.4x-5.x spellings)."""
    if arch in RELU_FAMILY:
        base, keys = RELU_FAMILY[arch]
        cfg = arch_config(base)
        if base == "llama":  # ReluLLaMA and ProSparse are Llama 2s: no RoPE scaling
            cfg.update(rope_theta=10000.0, rope_scaling=None)
        cfg.update(keys, intermediate_size=256)  # sparse FFNs are wide
        return cfg
    if arch == "llama":  # Llama 3.1-8B: untied, llama3 RoPE scaling
        return _common("LlamaForCausalLM", "llama", attention_bias=False, mlp_bias=False, pretraining_tp=1,
                       rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64,
                                                          "rope_type": "llama3"})
    if arch == "mistral":  # Mistral-7B-v0.3
        return _common("MistralForCausalLM", "mistral", rope_theta=1000000.0, sliding_window=None)
    if arch == "qwen2":  # Qwen2.5-0.5B: tied, Q/K/V biases (no config key: always on)
        return _common("Qwen2ForCausalLM", "qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=True, use_sliding_window=False, sliding_window=256,
                       max_window_layers=2)
    if arch == "qwen3":  # Qwen3-0.6B: tied, q_norm/k_norm per head, head_dim * heads != hidden_size
        return _common("Qwen3ForCausalLM", "qwen3", head_dim=32, attention_bias=False, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                       sliding_window=None, max_window_layers=2)
    if arch == "gemma3_text":  # gemma-3-1b: tied (no key), (1 + w) norms, local/global layers
        cfg = _common("Gemma3ForCausalLM", "gemma3_text", rms_norm_eps=1e-6, rope_theta=1000000.0,
                      hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=8,
                      sliding_window_pattern=2, layer_types=["sliding_attention", "full_attention"],
                      rope_local_base_freq=10000.0, attn_logit_softcapping=None,
                      final_logit_softcapping=None, attention_bias=False, eos_token_id=[EOS])
        del cfg["hidden_act"], cfg["tie_word_embeddings"]
        return cfg
    if arch == "gemma3":  # gemma-3-4b-it as published: image-text, the language model's config nested
        text = {k: v for k, v in arch_config("gemma3_text").items()
                if k not in ("architectures", "torch_dtype", "bos_token_id", "eos_token_id")}
        return {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text,
                "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "patch_size": 14},
                "mm_tokens_per_image": 256, "image_token_index": VOCAB - 1, "vocab_size": VOCAB,
                "bos_token_id": BOS, "eos_token_id": [EOS], "max_position_embeddings": 256,
                "torch_dtype": "float32"}
    if arch == "phi3":  # Phi-3-mini: fused qkv_proj and gate_up_proj, untied, no head_dim key
        cfg = _common("Phi3ForCausalLM", "phi3", original_max_position_embeddings=256, sliding_window=255,
                      embd_pdrop=0.0, resid_pdrop=0.0, attention_bias=False, pad_token_id=EOS)
        del cfg["head_dim"]
        return cfg
    if arch == "olmo2":  # OLMo-2-1124-7B: norms after attention and FFN, q_norm/k_norm over all heads
        return _common("Olmo2ForCausalLM", "olmo2", rms_norm_eps=1e-6, rope_theta=500000.0,
                       attention_bias=False)
    if arch == "granite":  # granite-3.0-2b: tied, multipliers (attention_multiplier = 1 / head_dim)
        return _common("GraniteForCausalLM", "granite", attention_bias=False, mlp_bias=False,
                       tie_word_embeddings=True, attention_multiplier=1 / 16, embedding_multiplier=12.0,
                       residual_multiplier=0.22, logits_scaling=8.0)
    raise ValueError(f"unknown architecture {arch!r}: choose from {ARCHS + list(RELU_FAMILY)}")


# Embedding std where 2 / sqrt(d) would let the token's own (scaled, tied) embedding dominate the
# residual stream, so that every logit row peaked at the input token: Gemma multiplies embeddings by
# sqrt(d), Granite by embedding_multiplier (and divides logits by logits_scaling: std ~0.04 here).
# Granite's o/down projections are also scaled up by 2 / residual_multiplier.
_EMBED_STD = {"gemma3_text": 0.06, "granite": 1.0 / 24}


def family(config: dict):
    """The RELU_FAMILY name a config selects, or None (the most specific match first)."""
    for name, (_, keys) in sorted(RELU_FAMILY.items(), key=lambda kv: -len(kv[1][1])):
        if all(config.get(k) == v for k, v in keys.items()):
            return name
    return None


def mlx_classes(config: dict):
    """mlx-lm's (Model, ModelArgs) for a config (`mlx_lm.utils.load_model`'s get_model_classes): the
    remote-code model types of the ReLU family get their base architecture's, whose sanitize drops
    the predictors TurboSparse ships."""
    from mlx_lm.utils import _get_classes

    name = family(config)
    if name is None:
        return _get_classes(config)
    Model, Args = _get_classes({**config, "model_type": RELU_FAMILY[name][0]})

    class WithoutShippedPredictors(Model):
        def sanitize(self, weights):
            return super().sanitize({k: v for k, v in weights.items() if SHIPPED_PREDICTOR not in k})

    return WithoutShippedPredictors, Args


def _mlx_class(config: dict):
    Model, Args = mlx_classes(config)
    return Model(Args.from_dict(config))


def _text(config: dict) -> dict:
    """The language model's config (Gemma 3's image-text checkpoints nest it)."""
    return config.get("text_config", config)


def _tied(config: dict) -> bool:
    return config.get("tie_word_embeddings", config["model_type"] in ("gemma3_text", "gemma3"))


def random_weights(config: dict, seed: int = 0) -> dict:
    """{mlx-lm / HF name: float32 numpy array} drawn for mlx-lm's class of this config."""
    model = _mlx_class(config)
    params = dict(tree_flatten(model.parameters()))
    rng = np.random.default_rng(seed)
    d = _text(config)["hidden_size"]
    gemma = config["model_type"] in ("gemma3_text", "gemma3")
    neutral = 0.0 if gemma else 1.0  # Gemma: x * (1 + w)
    embed_std = _EMBED_STD.get("gemma3_text" if gemma else config["model_type"], 2.0 / np.sqrt(d))
    residual_gain = 2.0 / config["residual_multiplier"] if "residual_multiplier" in config else 1.0
    out = {}
    for name in sorted(params):
        shape = params[name].shape
        if name.endswith("norm.weight"):
            w = neutral + 0.05 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight"):
            w = embed_std * rng.standard_normal(shape)
        elif name.endswith("lm_head.weight"):
            w = 2.0 / np.sqrt(d) * rng.standard_normal(shape)
        else:
            gain = residual_gain if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            w = gain * rng.standard_normal(shape) / np.sqrt(shape[-1])  # (out, in): fan_in = in
        out[name] = w.astype(np.float32)
    if _tied(config):  # tied checkpoints do not store it (gemma3's sanitize ties then)
        out = {k: v for k, v in out.items() if not k.endswith("lm_head.weight")}
    if config["model_type"] == "gemma3":  # the vision tower and projector, which the language model drops
        out["vision_tower.vision_model.embeddings.patch_embedding.weight"] = rng.standard_normal(
            (8, 14, 14, 3)).astype(np.float32)
        out["multi_modal_projector.mm_input_projection_weight"] = rng.standard_normal((8, d)).astype(np.float32)
    if family(config) == "drelu":  # TurboSparse's predictors (x -> rank -> d_ff), drawn last
        r, f = SHIPPED_PREDICTOR_RANK, config["intermediate_size"]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.{SHIPPED_PREDICTOR}"
            out[p + "0.weight"] = (rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float32)
            out[p + "1.weight"] = (rng.standard_normal((f, r)) / np.sqrt(r)).astype(np.float32)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _save(path: Path, tensors: dict, dtype: str) -> None:
    mx.save_safetensors(str(path), {k: mx.array(v).astype(getattr(mx, dtype)) for k, v in tensors.items()},
                        metadata={"format": "pt"})


def write_weights(folder: Path, weights: dict, dtype: str = "float32", shards: int = 1) -> None:
    """model.safetensors, or `shards` files model-0000i-of-0000n.safetensors split by tensor order
    plus model.safetensors.index.json (as transformers' save_pretrained writes them)."""
    if shards == 1:
        _save(folder / "model.safetensors", weights, dtype)
        return
    names = list(weights)
    parts = [names[i * len(names) // shards:(i + 1) * len(names) // shards] for i in range(shards)]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        _save(folder / file, {k: weights[k] for k in part}, dtype)
        weight_map.update({k: file for k in part})
    size = sum(v.size for v in weights.values()) * getattr(mx, dtype).size
    _write_json(folder / "model.safetensors.index.json",
                {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))})


def make_arch(folder, arch: str, quantized: bool = False, seed: int = 0, *, dtype: str = "float32",
              shards: int = 1, bits: int = 4, group_size: int = 32, quant_predicate=None, **overrides) -> Path:
    """Write a tiny random `arch` checkpoint into `folder` (which must not exist yet); returns it.

    dtype: "float32" | "bfloat16" | "float16" of the safetensors (config's torch_dtype follows).
    shards: number of safetensors shards (an index is written when > 1).
    quantized: convert with mlx-lm to `bits` / `group_size` with `quant_predicate` (see module doc).
    overrides: config.json keys to replace (e.g. num_hidden_layers=3).
    """
    folder = Path(folder)
    if quantized:
        # mlx-lm converts only the model types it knows: a ReLU-family member (remote code) is converted
        # as its base architecture (without TurboSparse's predictors), then gets its config keys back
        keys = RELU_FAMILY[arch][1] if arch in RELU_FAMILY else {}
        if "model_type" in keys:
            overrides = {**overrides, "model_type": RELU_FAMILY[arch][0]}
        src = make_arch(folder.with_name(folder.name + ".float"), arch, seed=seed, dtype=dtype, **overrides)
        from mlx_lm.convert import convert

        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its progress
            convert(str(src), str(folder), quantize=True, q_bits=bits, q_group_size=group_size,
                    quant_predicate=quant_predicate)
        if keys:
            config = json.loads((folder / "config.json").read_text())
            _write_json(folder / "config.json", {**config, **keys})
        return folder
    folder.mkdir(parents=True, exist_ok=False)
    config = arch_config(arch)
    config.update(overrides, torch_dtype=dtype)
    write_weights(folder, random_weights(config, seed), dtype, shards)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    write_tokenizer(folder, kind="llama", vocab_size=config["vocab_size"],
                    model_max_length=config["max_position_embeddings"])
    return folder


class _ActivationMLP(nn.Module):
    """mlx-lm's gated MLP with another activation on the gate (and on the up projection: dReLU)."""

    def __init__(self, mlp: nn.Module, gate_act, up_act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self._acts = (gate_act, up_act or (lambda x: x))

    def __call__(self, x):
        gate_act, up_act = self._acts
        return self.down_proj(gate_act(self.gate_proj(x)) * up_act(self.up_proj(x)))


def reference_model(folder):
    """mlx-lm's own model of the folder (`mlx_lm.utils.load_model`, strict). A ReLU-family member is
    built with its base architecture's class, TurboSparse's shipped predictors left out, and gets an
    MLP with its activation (mlx-lm's Llama MLP computes SiLU whatever `hidden_act` says)."""
    from mlx_lm.utils import load_model

    model, config = load_model(Path(folder), get_model_classes=mlx_classes)
    name = family(config)
    if name is not None:
        for layer in model.layers:
            layer.mlp = _ActivationMLP(layer.mlp, *RELU_ACTIVATIONS[name])
    model.eval()
    return model


def reference_logits(folder, ids) -> np.ndarray:
    """(len(ids), vocab) float32 logits of mlx-lm's model of the folder on `ids` (no cache)."""
    model = reference_model(folder)
    return np.array(model(mx.array(list(ids))[None])[0].astype(mx.float32))

