"""Read a llama.cpp GGUF file as a Hugging Face-style config, weights and tokenizer.

What each tensor type becomes in `load_gguf`'s weights (HF names):

- Q4_0, Q4_1, Q8_0: quantized, as mlx-lm's affine triple (`.weight` packed in uint32, `.scales` and
  `.biases` in float16, groups of 32), bit for bit what `mx.load` makes of them, and listed in the
  config's `quantization`.
- MXFP4 (gpt-oss's experts): MLX's mxfp4 (`.weight` packed in uint32, `.scales` the uint8 E8M0
  exponents, groups of 32, no biases), bit for bit: the same E2M1 codes and exponents, repacked (gguf-py
  dequantizes a block to what mx.dequantize(mode="mxfp4") makes of it). Read for routed experts only.
- F32, F16, BF16: as stored.
- Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q5_0, Q5_1: dequantized to float16 by MLX ops on the raw blocks,
  lazily: a tensor is expanded only when it is evaluated (convert does that one layer at a time).
- any other type gguf-py can dequantize (IQ*, TQ*, ...): dequantized to float16 by its numpy
  code while the file is read, so held whole.

A source whose FFN matrices arrive dequantized converts as a float model: its bundles are float16
unless convert's --quantize requantizes them.

Memory: the raw tensor bytes are read whole (about the file's size, which is what convert's budget
counts for a GGUF); a dequantized tensor exists only once evaluated.

Why not `mx.load`, which reads GGUF: it refuses a whole file holding one Q3_K, Q5_K, Q5_0, Q5_1 or
IQ tensor, and returns wrong values for Q4_K. Why not gguf-py's GGUFReader for the header: it takes
~12 s on Gemma 3's 262k-token vocabulary, `_read_table` 0.2 s.

Architectures (`general.architecture`), and what llama.cpp's convert_hf_to_gguf.py did that is
undone here:
- llama: Q/K rows permuted for llama.cpp's interleaved RoPE. With `llama.expert_count` it is a Mixtral
  (llama.cpp writes Mixtral as a llama with experts): model_type mixtral.
- qwen3moe: nothing (NEOX RoPE); every layer routes to experts, the top-k weights renormalized (llama.cpp's
  rule for it, or `expert_weights_norm` where the file says).
- qwen2, qwen3: nothing (NEOX RoPE is HF's order).
- gpt-oss: nothing to undo (NEOX RoPE; gate and up already split apart); its attention sinks
  (`attn_sinks.weight`) become `self_attn.sinks`; sliding-window attention in the even layers (llama.cpp's
  pattern), YaRN RoPE from the file's scaling keys.
- gemma3: every `*norm.weight` stored + 1 (HF's Gemma3RMSNorm multiplies by 1 + w). What the GGUF
  does not store, llama.cpp fixes and so do we: sliding-window pattern 6, local RoPE base 10000,
  query scale 1/sqrt(head_dim) (1/sqrt(hidden / heads) for the 62-layer 27B).

Tokenizers (`tokenizer.ggml.model`), written by `save_gguf_tokenizer` as a tokenizer.json that mlx-lm
loads: gpt2 (byte-level BPE with the file's merges) and llama (SentencePiece: Llama 1/2, Mistral, Gemma;
BPE with byte fallback, merges rebuilt from the scores, as transformers' GGUF loader builds it).

Mixtures of experts: each MoE layer's routed experts are three stacked tensors (`ffn_gate_exps`,
`ffn_up_exps`, `ffn_down_exps`, ggml dims (in, out, experts)), which in MLX order are mlx-lm's SwitchGLU
parameters (experts, out, in) as they are: named `...switch_mlp.gate_proj.weight` etc., quantized triples
or dequantized like any other tensor; the router `ffn_gate_inp` is the block's `gate`. convert_experts.py
then writes them as expert extents.

Not read: Llama 3.1+'s `rope_freqs` tensor (its RoPE scaling), per-expert tensors of old Mixtral GGUFs
(`blk.N.ffn_gate.E.weight`), other architectures; each is refused in one line.
"""

import mmap
import struct
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from .errors import FlashError

GGUF_GROUP_SIZE = 32  # weights per Q4_0/Q4_1/Q8_0 block: one scale and one bias each
DEQUANT_DTYPE = mx.float16  # what the other quantized types are expanded to
SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3moe", "gpt-oss", "gemma3")

_COMMON_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_NAMES = {**_COMMON_NAMES, "ffn_norm": "post_attention_layernorm"}


def _moe_names(block: str) -> dict:
    """A MoE layer's router and stacked experts, in mlx-lm's names (its sanitize leaves them as they are)."""
    dense = {k: v for k, v in _LLAMA_NAMES.items() if k not in ("ffn_gate", "ffn_up", "ffn_down")}
    return {**dense, "ffn_gate_inp": f"{block}.gate", "ffn_gate_exps": f"{block}.switch_mlp.gate_proj",
            "ffn_up_exps": f"{block}.switch_mlp.up_proj", "ffn_down_exps": f"{block}.switch_mlp.down_proj"}


_NAMES = {  # by the config's model_type
    "llama": _LLAMA_NAMES,
    "mixtral": _moe_names("block_sparse_moe"),
    "qwen2": _LLAMA_NAMES,
    "qwen3": _LLAMA_NAMES,
    "qwen3_moe": _moe_names("mlp"),
    "gpt_oss": {**{k: v for k, v in _COMMON_NAMES.items() if not k.startswith("ffn_")},
                "attn_sinks": "self_attn.sinks", "post_attention_norm": "post_attention_layernorm",
                "ffn_gate_inp": "mlp.router", "ffn_gate_exps": "mlp.experts.gate_proj",
                "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj"},
    "gemma3_text": {**_COMMON_NAMES, "post_attention_norm": "post_attention_layernorm",
                    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}


# --- the file's table of contents (GGUF v2/v3, little-endian) ------------------------------------

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
            11: "<i8", 12: "<f8"}  # metadata value type -> numpy dtype
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def _read_table(buf) -> Tuple[dict, Dict[str, Tuple[int, tuple, int]]]:
    """(metadata, {tensor name: (ggml type, shape in MLX order, absolute byte offset)})."""
    pos = 0

    def u32():
        nonlocal pos
        pos += 4
        return _U32.unpack_from(buf, pos - 4)[0]

    def u64():
        nonlocal pos
        pos += 8
        return _U64.unpack_from(buf, pos - 8)[0]

    def string():
        nonlocal pos
        n = u64()
        if pos + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        pos += n
        return buf[pos - n:pos].decode("utf-8", errors="replace")

    def value(kind):
        nonlocal pos
        if kind == _STRING:
            return string()
        if kind == _ARRAY:
            kind, n = u32(), u64()
            if kind == _STRING:
                return [string() for _ in range(n)]
            if kind not in _SCALARS:
                raise ValueError(f"metadata array of type {kind} is not supported")
            a = np.frombuffer(buf, _SCALARS[kind], n, pos).copy()  # a copy: the file can close
            pos += a.nbytes
            return a
        if kind not in _SCALARS:
            raise ValueError(f"metadata value of type {kind} is not supported")
        a = np.frombuffer(buf, _SCALARS[kind], 1, pos)
        pos += a.nbytes
        return a[0].item()

    if buf[:4] != b"GGUF":
        raise ValueError("it does not start with the GGUF magic")
    pos = 4
    version = u32()
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = u64(), u64()
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(u32())
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [u64() for _ in range(u32())]  # ggml order: the fastest-varying dimension first
        infos.append((name, u32(), tuple(reversed(dims)), u64()))
    align = int(meta.get("general.alignment", 32))
    start = -(-pos // align) * align
    return meta, {name: (kind, shape, start + offset) for name, kind, shape, offset in infos}


# --- tensor types ---------------------------------------------------------------------------------

def _f16(b: mx.array, i: int) -> mx.array:
    """The float16 at byte i of each block, as float32: (n_blocks, 1)."""
    return mx.view(b[:, i:i + 2], mx.float16).astype(mx.float32)


def _bits(x: mx.array, shifts, mask: int, group: int) -> mx.array:
    """Unpack fields: (n, k * group) bytes -> (n, k, len(shifts), group), each byte >> shift & mask."""
    x = x.reshape(x.shape[0], -1, 1, group) >> mx.array(shifts, mx.uint8).reshape(1, 1, -1, 1)
    return x & mask


def _nibbles(qs: mx.array) -> mx.array:
    """32 weights from the 16 bytes of a Q4_0/Q4_1/Q5 block: low nibbles first, then high: (n, 32)."""
    return _bits(qs, (0, 4), 0xF, 16).reshape(qs.shape[0], 32)


def _pack4(q: mx.array) -> mx.array:
    """(n, 32) 4-bit values -> MLX's packing, value i at bits 4 * (i % 8) of uint32 i // 8: (n, 4)."""
    q = q.reshape(q.shape[0], 16, 2)
    return mx.view(q[..., 0] | (q[..., 1] << 4), mx.uint32)


def _q4_0(b):  # (n, 18): d, 16 bytes of nibbles; w = d * (q - 8)
    d = mx.view(b[:, 0:2], mx.float16)
    return _pack4(_nibbles(b[:, 2:])), d, d * -8


def _q4_1(b):  # (n, 20): d, m, 16 bytes of nibbles; w = d * q + m
    return _pack4(_nibbles(b[:, 4:])), mx.view(b[:, 0:2], mx.float16), mx.view(b[:, 2:4], mx.float16)


def _q8_0(b):  # (n, 34): d, 32 int8; w = d * q = d * (q + 128) - 128 d
    d = mx.view(b[:, 0:2], mx.float16)
    return mx.view(b[:, 2:] ^ 0x80, mx.uint32), d, d * -128


def _q5(b, offset):  # Q5_0/Q5_1 quants: 32 high bits (a uint32), then 16 bytes of low nibbles
    qh = (mx.view(b[:, offset:offset + 4], mx.uint32) >> mx.arange(32, dtype=mx.uint32)) & 1
    return _nibbles(b[:, offset + 4:]) | (qh.astype(mx.uint8) << 4)


def _q5_0(b):  # (n, 22): d, quants; w = d * (q - 16)
    return _f16(b, 0) * (_q5(b, 2).astype(mx.int8) - 16).astype(mx.float32)


def _q5_1(b):  # (n, 24): d, m, quants; w = d * q + m
    return _f16(b, 0) * _q5(b, 4).astype(mx.float32) + _f16(b, 2)


def _scale_min_k4(s):
    """Q4_K/Q5_K: 8 6-bit scales and 8 6-bit mins packed in 12 bytes: (n, 8) each."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = mx.concatenate([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], axis=1)
    mn = mx.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(mx.float32), mn.astype(mx.float32)


def _q2_k(b):  # (n, 84): 16 scale/min bytes, 64 bytes of 2-bit quants, d, dmin; 16 groups of 16
    n = b.shape[0]
    s = b[:, :16]
    dl = (_f16(b, 80) * (s & 0xF).astype(mx.float32)).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (s >> 4).astype(mx.float32)).reshape(n, 16, 1)
    q = _bits(b[:, 16:80], (0, 2, 4, 6), 3, 32).reshape(n, 16, 16).astype(mx.float32)
    return (dl * q - ml).reshape(n, 256)


def _q3_k(b):  # (n, 110): 32 bytes of high bits, 64 bytes of 2-bit quants, 12 bytes of scales, d
    n = b.shape[0]
    lo = _bits(b[:, 96:104], (0, 4), 0xF, 8).reshape(n, 16)
    hi = _bits(b[:, 104:108], (0, 2, 4, 6), 3, 4).reshape(n, 16)
    scales = ((lo | (hi << 4)).astype(mx.int8) - 32).astype(mx.float32)
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = _bits(b[:, 32:96], (0, 2, 4, 6), 3, 32).reshape(n, 16, 16)
    qh = _bits(b[:, :32], tuple(range(8)), 1, 32).reshape(n, 16, 16) ^ 1  # a set bit means no -4
    q = (ql.astype(mx.int8) - (qh << 2).astype(mx.int8)).astype(mx.float32)
    return (dl * q).reshape(n, 256)


def _q4_k(b):  # (n, 144): d, dmin, 12 bytes of scales/mins, 128 bytes of nibbles; 8 groups of 32
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = _bits(b[:, 16:], (0, 4), 0xF, 32).reshape(n, 8, 32).astype(mx.float32)
    return (d * q - dm).reshape(n, 256)


def _q5_k(b):  # (n, 176): d, dmin, 12 bytes of scales/mins, 32 bytes of high bits, 128 of nibbles
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn).reshape(n, 8, 1)
    ql = _bits(b[:, 48:], (0, 4), 0xF, 32).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], tuple(range(8)), 1, 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).astype(mx.float32)
    return (d * q - dm).reshape(n, 256)


def _q6_k(b):  # (n, 210): 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d; 16 x 16
    n = b.shape[0]
    d = (_f16(b, 208) * mx.view(b[:, 192:208], mx.int8).astype(mx.float32)).reshape(n, 16, 1)
    ql = _bits(b[:, :128], (0, 4), 0xF, 64).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192], (0, 2, 4, 6), 3, 32).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).astype(mx.int8) - 32).reshape(n, 16, 16).astype(mx.float32)
    return (d * q).reshape(n, 256)


def _mxfp4(b):  # (n, 17): e8m0 exponent e, 16 bytes of E2M1 codes (low nibbles first); w = fp4(q) * 2^(e - 127)
    return _pack4(_nibbles(b[:, 1:])), b[:, 0:1]  # MLX's mxfp4: the same codes and exponents, repacked


_AFFINE = lambda bits: {"group_size": GGUF_GROUP_SIZE, "bits": bits}
_QUANTIZED = {T.Q4_0: (_q4_0, _AFFINE(4)), T.Q4_1: (_q4_1, _AFFINE(4)), T.Q8_0: (_q8_0, _AFFINE(8)),
              T.MXFP4: (_mxfp4, {"group_size": 32, "bits": 4, "mode": "mxfp4"})}  # -> MLX's arrays, quantization
_DEQUANT = {T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k,
            T.Q6_K: _q6_k}  # blocks (n, bytes) -> float32 (n, block size)
_FLOATS = {T.F32: mx.float32, T.F16: mx.float16, T.BF16: mx.bfloat16}


def _tensor(buf, name: str, kind: int, shape: tuple, offset: int):
    """One tensor: an MLX array, or (weight, scales, biases) for the types MLX keeps quantized."""
    try:
        kind = T(kind)
        block, size = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise ValueError(f"tensor {name} has an unknown type {kind}")
    if shape[-1] % block:
        raise ValueError(f"tensor {name}'s rows ({shape[-1]}) are not whole {kind.name} blocks")
    rows = int(np.prod(shape[:-1]))
    nbytes = rows * shape[-1] // block * size
    if offset + nbytes > len(buf):
        raise ValueError(f"tensor {name} runs past the end of the file (an incomplete download?)")
    raw = np.frombuffer(buf, np.uint8, nbytes, offset)
    if kind in _FLOATS:
        return mx.view(mx.array(raw), _FLOATS[kind]).reshape(shape)
    blocks = mx.array(raw).reshape(-1, size)  # (n_blocks, bytes per block)
    if kind in _QUANTIZED:
        return tuple(a.reshape(*shape[:-1], -1) for a in _QUANTIZED[kind][0](blocks))
    if kind in _DEQUANT:
        return _DEQUANT[kind](blocks).astype(DEQUANT_DTYPE).reshape(shape)
    from gguf.quants import dequantize

    try:
        w = dequantize(raw.reshape(rows, -1), kind)
    except NotImplementedError:
        raise ValueError(f"tensor {name} is {kind.name}, which gguf-py cannot dequantize")
    return mx.array(w.astype(np.float16)).astype(DEQUANT_DTYPE).reshape(shape)


# --- names, config, tokenizer ---------------------------------------------------------------------

def _hf_name(name: str, names: dict) -> str:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in names:
        # blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in names and not parts[0].startswith(("attn_", "ffn_")):
        return f"{names[parts[0]]}.{parts[1]}"
    return None


def _unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's permute(): interleaved-RoPE rows back to HF's half-split order.

    Rows are whole output features, so the same row shuffle applies to packed
    quantized weights, their scales and their biases.
    """
    shape = w.shape
    # (H * D, ...) -> (H, D/2, 2, ...) -> (H, 2, D/2, ...)
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _one(v, what: str) -> int:
    """A per-model integer that some GGUFs store per layer."""
    if isinstance(v, np.ndarray):
        if len(set(v.tolist())) != 1:
            raise FlashError(f"the GGUF's {what} differs between layers, which is not supported")
        v = v[0]
    return int(v)


def _config(arch: str, meta: dict, shapes: dict, path: Path) -> dict:
    required = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
    missing = [k for k in required if f"{arch}.{k}" not in meta]
    if missing:
        raise FlashError(f"{path}: the GGUF metadata lacks {arch}.{missing[0]}")

    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    gemma = arch == "gemma3"
    hidden, n_layers = int(g("embedding_length")), int(g("block_count"))
    n_heads = _one(g("attention.head_count"), "attention head count")
    head_dim = int(g("attention.key_length", hidden // n_heads))
    embed = shapes.get("token_embd.weight")
    experts = int(g("expert_count", 0))
    model_type = {"gemma3": "gemma3_text", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}.get(arch, arch)
    if arch == "llama" and experts:
        model_type = "mixtral"
    elif arch in ("qwen3moe", "gpt-oss") and not experts:
        raise FlashError(f"{path}: the GGUF metadata lacks {arch}.expert_count")
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": _one(g("feed_forward_length"), "FFN size"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _one(g("attention.head_count_kv", n_heads), "KV head count"),
        # stored as float32: 1e-5 arrives as 9.99999974e-06
        "rms_norm_eps": float(f'{g("attention.layer_norm_rms_epsilon", 1e-5 if arch == "llama" else 1e-6):.6g}'),
        "vocab_size": embed[0] if embed else int(g("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
        "rope_theta": float(g("rope.freq_base", 10000.0 if arch == "llama" else 1e6)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if arch == "llama":
        config["hidden_act"] = "silu"
    if arch != "qwen2" and f"{arch}.attention.key_length" in meta:
        config["head_dim"] = head_dim
    if arch == "qwen2" and head_dim * n_heads != hidden:
        raise FlashError(f"{path}: a qwen2 GGUF whose head size is not hidden / heads is not supported")
    if arch in ("qwen3", "qwen3moe", "gpt-oss"):
        config["head_dim"] = head_dim
    if experts:
        if f"{arch}.expert_used_count" not in meta:
            raise FlashError(f"{path}: the GGUF metadata lacks {arch}.expert_used_count")
        top_k = int(g("expert_used_count"))
        if model_type == "mixtral":
            config.update(num_local_experts=experts, num_experts_per_tok=top_k)
        elif model_type == "gpt_oss":  # llama.cpp's: sliding-window attention in the even layers
            if f"{arch}.attention.sliding_window" not in meta:
                raise FlashError(f"{path}: the GGUF metadata lacks {arch}.attention.sliding_window")
            config.update(num_local_experts=experts, num_experts_per_tok=top_k,
                          intermediate_size=int(g("expert_feed_forward_length", config["intermediate_size"])),
                          sliding_window=int(g("attention.sliding_window")),
                          layer_types=["sliding_attention" if l % 2 == 0 else "full_attention" for l in range(n_layers)])
        else:  # every layer routes (llama.cpp's qwen3moe has no dense layers)
            config.update(num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
                          moe_intermediate_size=int(g("expert_feed_forward_length", config["intermediate_size"])),
                          norm_topk_prob=bool(g("expert_weights_norm", True)))
    if gemma:
        config["head_dim"] = head_dim
        config["query_pre_attn_scalar"] = hidden // n_heads if n_layers == 62 else head_dim
        config["rope_local_base_freq"] = float(g("rope.freq_base_swa", 10000.0))
        window = g("attention.sliding_window")
        config["sliding_window"] = int(window or 512)
        pattern = g("attention.sliding_window_pattern", 6)  # a period, or per layer "is sliding"
        if isinstance(pattern, np.ndarray):
            pattern = int(np.argmin(pattern)) + 1 if not pattern.all() else 1 + len(pattern)
        config["sliding_window_pattern"] = 1 if window is None else int(pattern)  # 1: every layer global

    kind = g("rope.scaling.type", "linear" if g("rope.scale_linear", 1.0) != 1.0 else None)
    if kind in ("linear", "yarn"):
        config["rope_scaling"] = {"type": kind, "factor": float(g("rope.scaling.factor", g("rope.scale_linear")))}
        if kind == "yarn":
            original = g("rope.scaling.original_context_length", config["max_position_embeddings"])
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    elif kind not in (None, "none"):
        raise FlashError(f"{path}: GGUF RoPE scaling '{kind}' is not supported (supported: linear, yarn)")
    return config


def load_gguf(path: Path) -> Tuple[dict, Dict[str, mx.array], dict]:
    """Returns (config, weights with HF names, tokenizer metadata)."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        meta, table = _read_table(buf)
    except (OSError, ValueError, struct.error, IndexError, OverflowError) as e:
        raise FlashError(f"cannot read GGUF file {path}: {e}")
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise FlashError(f"{path}: GGUF architecture '{arch}' is not supported (supported: {', '.join(SUPPORTED)})")
    config = _config(arch, meta, {name: shape for name, (_, shape, _) in table.items()}, path)
    if not meta.get("tokenizer.ggml.tokens"):
        raise FlashError(f"{path}: the GGUF file has no tokenizer in its metadata")

    names = _NAMES[config["model_type"]]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    out, quant = {}, {}
    for name, (kind, shape, offset) in table.items():
        key = _hf_name(name, names)
        if key is None:
            raise FlashError(f"{path}: GGUF tensor '{name}' is not supported for architecture '{arch}'")
        try:
            w = _tensor(buf, name, kind, shape, offset)
        except ValueError as e:
            raise FlashError(f"cannot read GGUF file {path}: {e}")
        if key.endswith(".sinks.weight"):  # gpt-oss's attention sinks: llama.cpp names them with .weight
            key = key.removesuffix(".weight")
        module, _, suffix = key.rpartition(".")
        parts = dict(zip(("weight", "scales", "biases"), w)) if isinstance(w, tuple) else {suffix: w}
        for part, v in parts.items():
            if arch == "llama" and ".self_attn.q_proj." in key:
                v = _unpermute(v, n_heads)
            elif arch == "llama" and ".self_attn.k_proj." in key:
                v = _unpermute(v, n_kv)
            elif arch == "gemma3" and key.endswith("norm.weight"):
                v = v - 1  # llama.cpp stores Gemma's 1 + w
            out[f"{module}.{part}"] = v
        if isinstance(w, tuple):
            quant[module] = _QUANTIZED[T(kind)][1]
    if quant:
        # mlx-lm's convention: a default (the most common; on a tie, the most bits) plus per-module overrides
        kinds = [tuple(sorted(q.items())) for q in quant.values()]
        default = dict(max(sorted(set(kinds)), key=lambda k: (kinds.count(k), dict(k)["bits"])))
        config["quantization"] = {**default, **{m: q for m, q in quant.items() if q != default}}

    def number(key):
        v = meta.get(key)
        return None if v is None else int(v)

    tok = {
        "tokens": list(meta["tokenizer.ggml.tokens"]),
        "merges": list(meta.get("tokenizer.ggml.merges", [])),
        "model": meta.get("tokenizer.ggml.model"),
        "pre": meta.get("tokenizer.ggml.pre"),
        "token_type": [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
        if "tokenizer.ggml.token_type" in meta else None,
        "scores": meta["tokenizer.ggml.scores"].tolist() if "tokenizer.ggml.scores" in meta else None,
        "bos": number("tokenizer.ggml.bos_token_id"),
        "eos": number("tokenizer.ggml.eos_token_id"),
        "unk": number("tokenizer.ggml.unknown_token_id"),
        "pad": number("tokenizer.ggml.padding_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say
        "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
        "add_space_prefix": meta.get("tokenizer.ggml.add_space_prefix"),  # SentencePiece's add_dummy_prefix
        "chat_template": meta.get("tokenizer.chat_template"),
        "arch": arch,
    }
    return config, out, tok


# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"  # "▁": how SentencePiece spells a space


def save_gguf_tokenizer(tok: dict, folder: Path):
    """Write the GGUF's tokenizer as tokenizer.json + tokenizer_config.json.

    `tokenizer.ggml.model` "gpt2" is byte-level BPE; "llama" is a SentencePiece vocabulary (Llama 1/2,
    Mistral, Gemma), built as transformers' GGUF loader builds it (see `_sentencepiece_bpe`).
    """
    from transformers import PreTrainedTokenizerFast

    if tok["model"] == "gpt2":
        backend = _byte_level_bpe(tok)
    elif tok["model"] == "llama":
        backend = _sentencepiece_bpe(tok)
    else:
        raise FlashError(f"GGUF tokenizer model '{tok['model']}' is not supported "
                         "(supported: gpt2 byte-level BPE, llama SentencePiece)")
    name = lambda i: backend.id_to_token(i) if i is not None and 0 <= i < len(tok["tokens"]) else None
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
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


def _byte_level_bpe(tok: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

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
    types = tok["token_type"] or [NORMAL] * len(vocab)
    specials = [t for t, ty in zip(tok["tokens"], types) if ty in (CONTROL, USER_DEFINED)]
    bpe.add_special_tokens(specials)
    return bpe


def _sentencepiece_bpe(tok: dict):
    """A SentencePiece vocabulary as a `tokenizers` BPE with byte fallback, the way transformers' GGUF
    loader (integrations/gguf/gguf_tokenizer_mapping.py: LlamaTokenizer, GemmaTokenizer) builds it:

    - merges: a GGUF stores none, so every split of a token into two tokens becomes a merge, ranked by the
      token's score, the order SentencePiece's BPE merges in. For Gemma, whose scores transformers finds
      do not follow its merge order, the token's position in the file ranks (in Gemma 3's file the two
      orders agree on every normal token).
    - spaces: "▁", plus a leading "▁" on each stretch of text between special tokens unless
      `tokenizer.ggml.add_space_prefix` is false (Gemma): llama.cpp's rule, and SentencePiece's
      add_dummy_prefix on each stretch. A normalizer, not `Metaspace`, which writes " hi" as "▁hi" where
      SentencePiece writes "▁▁hi".
    - control tokens (and <unk>) are special added tokens, matched in the text as llama.cpp matches them
      when it parses special tokens; user-defined ones (Gemma's "\n\n", "<table>") are added tokens,
      matched whole as SentencePiece and llama.cpp match them. llama.cpp's converter spells "▁" in these
      as a space (Gemma's whitespace runs "▁▁".."▁"*31 became "  "...): they get their "▁" back and are
      matched in the normalized text, longest first, as SentencePiece does. (transformers instead builds
      them by BPE merges, which splits a run longer than the longest such token differently.)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    n = len(tok["tokens"])
    types = tok["token_type"] or [NORMAL] * n
    tokens = [t.replace(" ", SPIECE_SPACE) if ty == USER_DEFINED and " " in t else t
              for t, ty in zip(tok["tokens"], types)]
    vocab = {t: i for i, t in enumerate(tokens)}  # a duplicate spelling keeps its last id, as transformers'
    by_position = (tok.get("arch") or "").startswith("gemma") or not tok["scores"] or len(set(tok["scores"])) == 1
    scores = [-i for i in range(n)] if by_position else tok["scores"]
    merges = _merges_from_scores(tokens, types, scores)

    unk = tok["unk"] if tok["unk"] is not None and 0 <= tok["unk"] < n else None
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None if unk is None else tokens[unk],
                               fuse_unk=True, byte_fallback=BYTE in types))
    prefix = tok.get("add_space_prefix")
    prefix = True if prefix is None else prefix  # llama.cpp's default for a SentencePiece vocabulary
    space = normalizers.Replace(" ", SPIECE_SPACE)
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), space]) if prefix else space
    # mlx-lm's loader recognises these two decoders and streams text with its SentencePiece detokenizer
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    bpe.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)

    bpe.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    # one spelled with "▁" is matched in the normalized text, as SentencePiece matches user-defined pieces
    bpe.add_tokens([AddedToken(t, normalized=SPIECE_SPACE in t, special=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    return bpe


def _merges_from_scores(tokens: list, types: list, scores: list) -> list:
    """Every (left, right) whose concatenation is a token, best-scored result first.

    As transformers' `generate_merges`: ties go to the longer left, then the longer right part. Control,
    unknown and byte tokens are neither made nor used by merges, as in SentencePiece.
    """
    mergeable = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (UNKNOWN, CONTROL, BYTE)}
    found = []
    for t, i in mergeable.items():
        pairs = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in mergeable and t[k:] in mergeable]
        pairs.sort(key=lambda p: (mergeable[p[0]], mergeable[p[1]]))
        found += [(float(scores[i]), l, r) for l, r in pairs]
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(l, r) for _, l, r in found]
