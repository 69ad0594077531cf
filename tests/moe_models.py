"""Tiny random mixture-of-experts checkpoints, built with mlx-lm's classes (tests/arch_models.py's machinery).

    folder = make_moe(tmp / "qwen3_moe", "qwen3_moe")                 # float32, experts one tensor each (HF)
    q4 = make_moe(tmp / "mixtral-q4", "mixtral", quantized=True)      # mlx-lm's converter, 4 bits, group 32
    ref = reference_logits(folder, [1, 5, 9])                          # mlx-lm's own forward pass

Geometry: 8 experts per MoE layer, 2 per token, expert width 32, d_model 64. qwen3_moe has three
layers, the middle one dense (`mlp_only_layers`), so a resident dense FFN sits between two streamed
MoE layers. qwen3_moe and mixtral are written as the Hub ships them, one tensor per expert
(`mlp.experts.<e>.gate_proj.weight`, `block_sparse_moe.experts.<e>.w1.weight`), which mlx-lm's sanitize
stacks; gpt_oss in mlx-lm's stacked names (an mlx-community checkpoint's layout), with its biases.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from arch_models import BOS, EOS, VOCAB, _write_json, random_weights, reference_logits, write_weights  # noqa: F401
from tiny_models import write_tokenizer

MOE_ARCHS = ["qwen3_moe", "mixtral", "gpt_oss"]
EXPERTS, TOP_K, EXPERT_FF = 8, 2, 32

_COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
               max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
               tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, torch_dtype="float32")


def moe_config(arch: str) -> dict:
    """config.json of a tiny checkpoint of `arch`, with the keys the Hub's configs of that model_type carry."""
    if arch == "qwen3_moe":  # Qwen3-30B-A3B's keys
        return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **_COMMON,
                "num_hidden_layers": 3, "intermediate_size": 96, "moe_intermediate_size": EXPERT_FF,
                "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "decoder_sparse_step": 1,
                "mlp_only_layers": [1], "norm_topk_prob": True, "hidden_act": "silu", "attention_bias": False}
    if arch == "mixtral":  # Mixtral-8x7B's keys
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **_COMMON, "num_hidden_layers": 2,
                "intermediate_size": EXPERT_FF, "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K,
                "hidden_act": "silu", "router_aux_loss_coef": 0.02, "sliding_window": None}
    if arch == "gpt_oss":  # gpt-oss-20b's keys: sliding and full attention layers, attention sinks
        return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", **_COMMON, "num_hidden_layers": 2,
                "intermediate_size": EXPERT_FF, "num_local_experts": EXPERTS, "num_experts_per_tok": TOP_K,
                "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
    raise ValueError(f"unknown MoE architecture {arch!r}: choose from {MOE_ARCHS}")


def _hub_names(arch: str, weights: dict, config: dict) -> dict:
    """mlx-lm's stacked expert tensors (experts, out, in) -> one tensor per expert, as the Hub ships them."""
    if arch == "gpt_oss":
        return weights
    block, switch, names = {"qwen3_moe": ("mlp", "switch_mlp", {"gate_proj": "gate_proj", "up_proj": "up_proj",
                                                                 "down_proj": "down_proj"}),
                            "mixtral": ("block_sparse_moe", "switch_mlp", {"gate_proj": "w1", "down_proj": "w2",
                                                                            "up_proj": "w3"})}[arch]
    out = {}
    for k, v in weights.items():
        head, sep, tail = k.partition(f".{block}.{switch}.")
        if not sep:
            out[k] = v
            continue
        proj = tail.split(".")[0]
        for e in range(v.shape[0]):
            out[f"{head}.{block}.experts.{e}.{names[proj]}.weight"] = v[e]
    return out


def make_moe(folder, arch: str, quantized: bool = False, seed: int = 0, *, bits: int = 4, group_size: int = 32,
             quant_predicate=None, **overrides) -> Path:
    """Write a tiny random `arch` checkpoint into `folder` (which must not exist yet); returns it.
    quantized: mlx-lm's converter (`mlx_lm.convert.convert`) on a float folder written beside it, with
    `quant_predicate` (an mlx-lm recipe such as "mixed_3_6": some layers' down projections at 6 bits)."""
    folder = Path(folder)
    if quantized:
        src = make_moe(folder.with_name(folder.name + ".float"), arch, seed=seed, **overrides)
        from mlx_lm.convert import convert

        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its progress
            convert(str(src), str(folder), quantize=True, q_bits=bits, q_group_size=group_size,
                    quant_predicate=quant_predicate)
        return folder
    folder.mkdir(parents=True, exist_ok=False)
    config = {**moe_config(arch), **overrides}
    write_weights(folder, _hub_names(arch, random_weights(config, seed), config))
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": EOS})
    write_tokenizer(folder, kind="llama", vocab_size=VOCAB, model_max_length=256)
    return folder


def config_of(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())
