"""The peer benchmark's models: the built-in one, a synthetic Llama geometry or a .gguf path, as a GGUF both
llama.cpp and mlx-flash read, and the flash folder `prepare` makes of it.

The synthetic GGUF is written as llama.cpp's converter writes one (gguf-py's GGUFWriter, Llama
architecture, random weights, Q4_1 matrices like the built-in model's), with the built-in model's
tokenizer borrowed, so that `prepare` converts and calibrates it as it would any GGUF.
"""

import math
import sys
from pathlib import Path

import numpy as np

from ..errors import FlashError

# name -> Llama geometry; the vocabulary is the built-in model's (its tokenizer is borrowed)
GEOMETRIES = {
    # Llama 3.2 1B's layer (d_model 2048, FFN 8192 SwiGLU, GQA 32/8), 4 of its 16 layers
    "llama-1b-L4": dict(layers=4, d_model=2048, d_ff=8192, heads=32, kv_heads=8),
    "tiny": dict(layers=2, d_model=64, d_ff=256, heads=4, kv_heads=2),  # tests
}
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template")


def builtin_tokenizer() -> dict:
    """The built-in model's tokenizer metadata (GPT-2 BPE, 49,152 tokens), read from its GGUF header."""
    import mmap

    from ..gguf import _read_table
    from ..sources import BUILTIN_MODELS, builtin_path

    path = builtin_path(next(iter(BUILTIN_MODELS)))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        meta, _ = _read_table(buf)
    return {k: meta[k] for k in TOKENIZER_KEYS if k in meta}


def write_synthetic_gguf(path: Path, name: str, seed: int = 0) -> Path:
    """A random Llama of geometry `name` as llama.cpp's converter writes one (Q4_1 matrices, a Q8_0 tied
    embedding, float32 norms), written once (atomically) and reused."""
    import gguf
    from gguf import GGMLQuantizationType as T

    g = GEOMETRIES[name]
    if path.exists():
        return path
    tok = builtin_tokenizer()
    vocab, d, ff = len(tok["tokenizer.ggml.tokens"]), g["d_model"], g["d_ff"]
    head_dim = d // g["heads"]
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"mlx-flash synthetic {name} (random weights)")
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_block_count(g["layers"])
    w.add_feed_forward_length(ff)
    w.add_head_count(g["heads"])
    w.add_head_count_kv(g["kv_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types([int(x) for x in tok["tokenizer.ggml.token_type"]])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unknown_token_id", w.add_unk_token_id), ("padding_token_id", w.add_pad_token_id),
                     ("add_bos_token", w.add_add_bos_token), ("add_space_prefix", w.add_add_space_prefix)):
        if f"tokenizer.ggml.{key}" in tok:
            add(tok[f"tokenizer.ggml.{key}"])
    if "tokenizer.chat_template" in tok:
        w.add_chat_template(tok["tokenizer.chat_template"])
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int, kind=T.Q4_1):  # (rows, cols): (out, in), std 1/sqrt(in)
        return gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32) / math.sqrt(cols), kind), kind

    tensors = {"token_embd.weight": matrix(vocab, d, T.Q8_0), "output_norm.weight": (np.ones(d, np.float32), None)}
    for l in range(g["layers"]):
        tensors.update({
            f"blk.{l}.attn_norm.weight": (np.ones(d, np.float32), None),
            f"blk.{l}.attn_q.weight": matrix(d, d), f"blk.{l}.attn_k.weight": matrix(g["kv_heads"] * head_dim, d),
            f"blk.{l}.attn_v.weight": matrix(g["kv_heads"] * head_dim, d), f"blk.{l}.attn_output.weight": matrix(d, d),
            f"blk.{l}.ffn_norm.weight": (np.ones(d, np.float32), None),
            f"blk.{l}.ffn_gate.weight": matrix(ff, d), f"blk.{l}.ffn_up.weight": matrix(ff, d),
            f"blk.{l}.ffn_down.weight": matrix(d, ff)})
    for key, (data, kind) in tensors.items():
        w.add_tensor(key, data, raw_dtype=kind) if kind is not None else w.add_tensor(key, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path


def resolve_model(name: str) -> dict:
    """{name, gguf, folder}: a built-in name, a synthetic geometry or a .gguf path; the flash folder is
    prepared (converted and calibrated) on first use, as every command prepares a built-in name."""
    from ..prepare import prepare
    from ..sources import BUILTIN_MODELS, builtin_path, default_folder

    if name in BUILTIN_MODELS:
        return {"name": name, "gguf": builtin_path(name), "folder": prepare(name), "synthetic": False}
    if name in GEOMETRIES:
        gguf_path = default_folder(f"peer-{name}").with_suffix(".gguf")
        if not gguf_path.exists():
            print(f"== writing the synthetic {name} GGUF to {gguf_path} (once)", file=sys.stderr)
        write_synthetic_gguf(gguf_path, name)
        return {"name": name, "gguf": gguf_path, "folder": prepare(str(gguf_path)), "synthetic": True}
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return {"name": path.stem, "gguf": path, "folder": prepare(str(path)), "synthetic": False}
    raise FlashError(f"--models: '{name}' is not a built-in model ({', '.join(BUILTIN_MODELS)}), a synthetic "
                     f"geometry ({', '.join(g for g in GEOMETRIES if g != 'tiny')}) or a .gguf file")
