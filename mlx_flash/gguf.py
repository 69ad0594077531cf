"""Read a llama.cpp GGUF file as a Hugging Face-style config, weights and tokenizer.

`mx.load` reads GGUF natively: Q4_0/Q4_1/Q8_0 tensors arrive as MLX affine
quantized triples (weight, scales, biases) with groups of 32. What is left is
naming, the config, the tokenizer stored in the metadata, and the Q/K row
permutation llama.cpp applies for its interleaved RoPE.
"""

from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx

from .errors import FlashError

GGUF_GROUP_SIZE = 32

_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":  # blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight
        return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[3]}"
    return f"{_NAMES[parts[0]]}.{parts[1]}"


def _scalar(meta, key, default=None):
    v = meta.get(key, default)
    if isinstance(v, mx.array):
        v = v.item()
    return v


def _unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's permute(): interleaved-RoPE rows back to HF's half-split order.

    Rows are whole output features, so the same row shuffle applies to packed
    quantized weights, their scales and their biases.
    """
    shape = w.shape
    # (H * D, ...) -> (H, D/2, 2, ...) -> (H, 2, D/2, ...)
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def load_gguf(path: Path) -> Tuple[dict, Dict[str, mx.array], dict]:
    """Returns (config, weights with HF names, tokenizer metadata)."""
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with the C++ message
        raise FlashError(f"cannot read GGUF file {path}: {e}")
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise FlashError(f"{path}: GGUF architecture '{arch}' is not supported (supported: llama)")

    required = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
    missing = [k for k in required if f"llama.{k}" not in meta]
    if missing:
        raise FlashError(f"{path}: the GGUF metadata lacks llama.{missing[0]}")
    g = lambda k, d=None: _scalar(meta, f"llama.{k}", d)
    n_heads, n_kv = int(g("attention.head_count")), int(g("attention.head_count_kv", g("attention.head_count")))
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise FlashError(f"{path}: the GGUF file has no tokenizer in its metadata")
    config = {
        "model_type": "llama",
        "hidden_size": int(g("embedding_length")),
        "num_hidden_layers": int(g("block_count")),
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": float(f'{g("attention.layer_norm_rms_epsilon", 1e-5):.6g}'),  # stored as float32
        "vocab_size": int(g("vocab_size", len(tokens))),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in weights,
    }

    out, quant = {}, {}
    for name, w in weights.items():
        key = _hf_name(name)
        if ".self_attn.q_proj." in key:
            w = _unpermute(w, n_heads)
        elif ".self_attn.k_proj." in key:
            w = _unpermute(w, n_kv)
        out[key] = w
        if key.endswith(".scales"):
            module = key[: -len(".scales")]
            in_dim = w.shape[-1] * GGUF_GROUP_SIZE
            bits = weights[name.replace(".scales", ".weight")].shape[-1] * 32 // in_dim
            quant[module] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
    if quant:
        # mlx-lm's convention: a default plus per-module overrides
        bits = max(set(q["bits"] for q in quant.values()), key=[q["bits"] for q in quant.values()].count)
        config["quantization"] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
        config["quantization"].update({m: q for m, q in quant.items() if q["bits"] != bits})

    tok = {
        "tokens": list(tokens),
        "merges": list(meta.get("tokenizer.ggml.merges", [])),
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "token_type": [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
        if "tokenizer.ggml.token_type" in meta else None,
        "bos": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "unk": _scalar(meta, "tokenizer.ggml.unknown_token_id"),
        "pad": _scalar(meta, "tokenizer.ggml.padding_token_id"),
        "add_bos": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return config, out, tok


def save_gguf_tokenizer(tok: dict, folder: Path):
    """Write the GGUF's GPT-2-style BPE tokenizer as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if tok["model"] != "gpt2":
        raise FlashError(f"GGUF tokenizer model '{tok['model']}' is not supported (supported: gpt2 BPE)")
    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if tok["pre"] in ("smollm", "starcoder", "refact", "qwen2", "llama-bpe", "llama3"):
        # these pre-tokenizers split digits one by one before the byte-level regex
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        bpe.pre_tokenizer = byte_level
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    types = tok["token_type"] or [1] * len(vocab)
    specials = [t for t, ty in zip(tok["tokens"], types) if ty in (3, 4)]  # control, user-defined
    bpe.add_special_tokens(specials)

    name = lambda i: tok["tokens"][i] if i is not None and 0 <= i < len(tok["tokens"]) else None
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=name(tok["bos"]),
        eos_token=name(tok["eos"]),
        unk_token=name(tok["unk"]),
        pad_token=name(tok["pad"]),
        add_bos_token=tok["add_bos"],
        clean_up_tokenization_spaces=False,
    )
    if tok["chat_template"]:
        hf.chat_template = tok["chat_template"]
    hf.save_pretrained(str(folder))
