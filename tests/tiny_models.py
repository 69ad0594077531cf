"""Deterministic tiny random models in exact Hugging Face folder layout.

Used by the tests as stand-ins for real checkpoints (Llama / ReLU-Llama / OPT),
so conversion, loading and numerics can be checked without downloads.
Only numpy + safetensors + json (+ ``tokenizers`` for tokenizer.json); no torch,
no mlx, so the same helper also runs in the reference venv that produces the
golden values (``tests/golden/make_opt_golden.py``).

Usage::

    from tests.tiny_models import make_llama, make_opt   # or: import tiny_models

    folder = make_llama(tmp_path / "llama")                        # SiLU, tied
    relu = make_llama(tmp_path / "relu", hidden_act="relu",
                      tie_word_embeddings=False, seed=0)           # ReLU-Llama
    opt = make_opt(tmp_path / "opt")                               # pre-LN OPT
    opt350 = make_opt(tmp_path / "opt350", do_layer_norm_before=False,
                      word_embed_proj_dim=32)                      # opt-350m-like
    small = make_llama(tmp_path / "l4", num_hidden_layers=4)       # overrides

Each folder holds ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32, HF tensor names, metadata ``{"format": "pt"}``),
``tokenizer.json`` (byte-level BPE filling the whole vocabulary, so every id
decodes) and ``tokenizer_config.json`` (bos/eos, ChatML-like chat_template).

Determinism: every tensor is drawn from ``numpy.random.default_rng(seed)`` in a
fixed order (PCG64 + float64 normals, then cast to float32), so the same seed
gives byte-identical files on any machine. Tensors that exist only in some
variants (``lm_head.weight`` when untied) are drawn last, so the tied and
untied models share all other weights; ``hidden_act`` does not change weights.

Weight scales (``_LLAMA_SCALES``, ``_OPT_SCALES``) are chosen for
non-degenerate activations: linear weights ~ N(0, c^2/fan_in), norm gains
1 + N(0, .05), logits with std ~2, argmax not simply the input token, greedy
decoding that does not collapse at once (tied models still repeat sooner).
FFN sparsity is realistic but not extreme (with the defaults ~12-16% of OPT
neurons and ~8-25% of ReLU-Llama neurons are active per token, varying by token
and layer, some "hot" neurons): OPT via negative fc1 biases; (ReLU-)Llama, which
has no biases, via a shared direction ``u`` in the token embeddings (like the
outlier dimensions of real LLMs) and per-neuron gate offsets along ``u``
(mostly negative); q/k/v/up projections, lm_head and the embedding noise are
orthogonal to ``u`` so it causes neither attention sinks nor a constant logit
bias. The golden JSON files record the measured active fractions.

HF OPT details mirrored here (transformers ``modeling_opt.py``):
  * ``embed_positions`` has ``max_position_embeddings + 2`` rows; position p
    (0-based, from cumsum(attention_mask) - 1) reads row p + 2.
  * ``model.decoder.final_layer_norm`` exists only when
    ``do_layer_norm_before and not _remove_final_layer_norm``; post-LN (opt-350m)
    applies self_attn_layer_norm / final_layer_norm *after* each residual add
    and has no decoder-level final norm.
  * ``project_in`` / ``project_out`` (no bias) exist iff
    ``word_embed_proj_dim != hidden_size``; embed_tokens and lm_head have width
    ``word_embed_proj_dim``; project_out runs after the (optional) final norm.
  * lm_head is tied to embed_tokens and omitted from the checkpoint.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

__all__ = [
    "make_llama",
    "make_opt",
    "llama_config",
    "opt_config",
    "write_tokenizer",
    "CHAT_TEMPLATE",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------
# helpers


def _normal(rng: np.random.Generator, shape, std: float, mean=0.0) -> np.ndarray:
    return (rng.standard_normal(shape) * std + mean).astype(np.float32)


# Reductions below avoid BLAS (matmul / linalg.norm), whose summation order
# depends on the machine: a fixed-order loop of elementwise float64 ops is
# bit-identical everywhere, so the float32 weights are too.


def _rowdot(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    acc = np.zeros(w.shape[0], dtype=np.float64)
    for j in range(w.shape[1]):
        acc = acc + w[:, j] * u[j]
    return acc


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n)
    return v / np.sqrt(_rowdot(v[None, :], v)[0])


def _perp(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rows of ``w`` with their component along unit vector ``u`` removed."""
    w = w.astype(np.float64)
    return (w - np.outer(_rowdot(w, u), u)).astype(np.float32)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _save(folder: Path, tensors: dict, name: str = "model.safetensors") -> None:
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(tensors, str(folder / name), metadata={"format": "pt"})


class _Shards:
    """Writes tensors shard by shard (``model-00001-of-0000N.safetensors`` plus the
    index), so that a model larger than the writer's memory can be made."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n, self.weight_map, self.size = folder, n, {}, 0

    def flush(self, tensors: dict) -> None:
        name = f"model-{len(set(self.weight_map.values())) + 1:05d}-of-{self.n:05d}.safetensors"
        _save(self.folder, tensors, name)
        self.weight_map.update({k: name for k in tensors})
        self.size += sum(v.size * 4 for v in tensors.values())
        tensors.clear()

    def close(self, tensors: dict) -> None:
        self.flush(tensors)
        _write_json(self.folder / "model.safetensors.index.json",
                    {"metadata": {"total_size": self.size}, "weight_map": self.weight_map})


# --------------------------------------------------------------------------
# Llama

# std multipliers (see make_llama); tuned so that logits are not dominated by
# the input token, greedy decoding does not collapse at once, and ReLU keeps a
# minority of neurons active. Changing them changes every golden value.
_LLAMA_SCALES = dict(embed=0.25, embed_u=1.5, o_proj=1.0, down_proj=1.0,
                     gate_u_std=0.07, gate_u_mean=-0.25, lm_head=0.25)


def llama_config(
    *, hidden_act="silu", tie_word_embeddings=True, num_key_value_heads=2, **overrides
) -> dict:
    """config.json contents of a tiny Llama (classic hub format, rope_theta)."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": None,  # filled below: hidden_size // num_attention_heads
        "hidden_act": hidden_act,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": tie_word_embeddings,
        "vocab_size": 512,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    cfg.update(overrides)
    if cfg["head_dim"] is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def make_llama(
    folder,
    *,
    hidden_act: str = "silu",
    tie_word_embeddings: bool = True,
    num_key_value_heads: int = 2,
    seed: int = 0,
    shard_layers: int | None = None,
    **overrides,
) -> Path:
    """Write a tiny random Llama (LlamaForCausalLM layout) into ``folder``.

    ``hidden_act="relu"`` gives a ReLU-Llama (SparseLLM/ReluLLaMA-7B style).
    ``overrides`` replace config.json fields (e.g. ``num_hidden_layers=4``,
    ``hidden_size=128``, ``vocab_size=1024``). ``shard_layers``: write a shard
    every that many layers, holding no more than that in memory (same weights).
    Returns the folder as a Path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(
        hidden_act=hidden_act,
        tie_word_embeddings=tie_word_embeddings,
        num_key_value_heads=num_key_value_heads,
        **overrides,
    )
    d, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rng = np.random.default_rng(seed)

    # Shared direction u: every token embedding has a component a*u, so the
    # normalised FFN input has a consistent projection on u; gate rows get an
    # offset b_i*u (mostly negative) -> ReLU sparsity with "hot" neurons.
    S = _LLAMA_SCALES
    u = _unit(rng, d)
    t = {}
    emb = _perp(rng.standard_normal((V, d)) * S["embed"], u)  # no token favoured by u
    # u component with norm embed_u * (expected norm of the noise part)
    emb_u = S["embed_u"] * S["embed"] * np.sqrt(d)
    t["model.embed_tokens.weight"] = (emb + emb_u * u).astype(np.float32)
    s_in = 1.0 / np.sqrt(d)
    n_layers = cfg["num_hidden_layers"]
    shards = _Shards(folder, -(-n_layers // shard_layers)) if shard_layers else None
    for i in range(n_layers):
        if shards and i and i % shard_layers == 0:
            shards.flush(t)
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _normal(rng, (d,), 0.05, 1.0)
        # q/k/v_proj and up_proj ignore u, so the shared component does not
        # turn into attention sinks or a constant vector in the residual
        # stream (either gives a constant logit bias: greedy collapses)
        t[p + "self_attn.q_proj.weight"] = _perp(_normal(rng, (nh * hd, d), s_in), u)
        t[p + "self_attn.k_proj.weight"] = _perp(_normal(rng, (nkv * hd, d), s_in), u)
        t[p + "self_attn.v_proj.weight"] = _perp(_normal(rng, (nkv * hd, d), s_in), u)
        t[p + "self_attn.o_proj.weight"] = _normal(rng, (d, nh * hd), S["o_proj"] / np.sqrt(nh * hd))
        t[p + "post_attention_layernorm.weight"] = _normal(rng, (d,), 0.05, 1.0)
        offs = rng.standard_normal(f) * S["gate_u_std"] + S["gate_u_mean"]  # offset along u
        gate = rng.standard_normal((f, d)) * s_in + offs[:, None] * u[None, :]
        t[p + "mlp.gate_proj.weight"] = gate.astype(np.float32)
        t[p + "mlp.up_proj.weight"] = _perp(_normal(rng, (f, d), s_in), u)
        t[p + "mlp.down_proj.weight"] = _normal(rng, (d, f), S["down_proj"] / np.sqrt(f))
    t["model.norm.weight"] = _normal(rng, (d,), 0.05, 1.0)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = _perp(rng.standard_normal((V, d)) * S["lm_head"], u)

    _write_json(folder / "config.json", cfg)
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]},
    )
    if shards:
        shards.close(t)
    else:
        _save(folder, t)
    write_tokenizer(folder, kind="llama", vocab_size=V, model_max_length=cfg["max_position_embeddings"])
    return folder


# --------------------------------------------------------------------------
# OPT

_OPT_SCALES = dict(embed=0.25, pos=0.25, qk=1.0, out_proj=1.5, fc2=3.0,
                   fc1_b_mean=-1.25, fc1_b_std=0.5)


def opt_config(*, do_layer_norm_before=True, word_embed_proj_dim=None, **overrides) -> dict:
    """config.json contents of a tiny OPT (fields as in facebook/opt-* configs)."""
    cfg = {
        "_name_or_path": "tiny-opt",
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "activation_dropout": 0.0,
        "activation_function": "relu",
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "do_layer_norm_before": do_layer_norm_before,
        "dropout": 0.1,
        "enable_bias": True,
        "eos_token_id": 2,
        "ffn_dim": 256,
        "hidden_size": 64,
        "init_std": 0.02,
        "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0,
        "max_position_embeddings": 256,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "prefix": "</s>",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": 512,
        "word_embed_proj_dim": None,
        "_remove_final_layer_norm": False,
    }
    cfg.update(overrides)
    if word_embed_proj_dim is not None:
        cfg["word_embed_proj_dim"] = word_embed_proj_dim
    if cfg["word_embed_proj_dim"] is None:
        cfg["word_embed_proj_dim"] = cfg["hidden_size"]
    return cfg


def make_opt(
    folder,
    *,
    do_layer_norm_before: bool = True,
    word_embed_proj_dim: int | None = None,
    seed: int = 0,
    **overrides,
) -> Path:
    """Write a tiny random OPT (OPTForCausalLM layout) into ``folder``.

    ``do_layer_norm_before=False`` gives post-LN (opt-350m style, no decoder
    final_layer_norm); ``word_embed_proj_dim`` != hidden_size (e.g. 32 vs 64)
    adds ``project_in``/``project_out``. lm_head is tied and omitted.
    ``overrides`` replace config.json fields. Returns the folder as a Path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = opt_config(
        do_layer_norm_before=do_layer_norm_before,
        word_embed_proj_dim=word_embed_proj_dim,
        **overrides,
    )
    d, f, V = cfg["hidden_size"], cfg["ffn_dim"], cfg["vocab_size"]
    e = cfg["word_embed_proj_dim"]
    P = cfg["max_position_embeddings"] + 2  # OPT's learned-position offset of 2
    bias = cfg["enable_bias"]
    affine = cfg["layer_norm_elementwise_affine"]
    rng = np.random.default_rng(seed)

    def ln(prefix):
        if affine:
            t[prefix + ".weight"] = _normal(rng, (d,), 0.05, 1.0)
            t[prefix + ".bias"] = _normal(rng, (d,), 0.02)

    def linear(prefix, out_f, in_f, std, b_std=0.02, b_mean=0.0):
        t[prefix + ".weight"] = _normal(rng, (out_f, in_f), std)
        if bias:
            t[prefix + ".bias"] = _normal(rng, (out_f,), b_std, b_mean)

    t = {}
    D = "model.decoder."
    S = _OPT_SCALES
    t[D + "embed_tokens.weight"] = _normal(rng, (V, e), S["embed"])
    t[D + "embed_positions.weight"] = _normal(rng, (P, d), S["pos"])
    if e != d:
        t[D + "project_in.weight"] = _normal(rng, (d, e), 1.0 / np.sqrt(e))
        t[D + "project_out.weight"] = _normal(rng, (e, d), 1.0 / np.sqrt(d))
    s_in = 1.0 / np.sqrt(d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"{D}layers.{i}."
        linear(p + "self_attn.q_proj", d, d, S["qk"] * s_in)
        linear(p + "self_attn.k_proj", d, d, S["qk"] * s_in)
        linear(p + "self_attn.v_proj", d, d, s_in)
        linear(p + "self_attn.out_proj", d, d, S["out_proj"] * s_in)
        ln(p + "self_attn_layer_norm")
        # negative fc1 bias -> ~20% of ReLU neurons active (real OPT is sparser)
        linear(p + "fc1", f, d, s_in, b_std=S["fc1_b_std"], b_mean=S["fc1_b_mean"])
        linear(p + "fc2", d, f, S["fc2"] / np.sqrt(f))
        ln(p + "final_layer_norm")
    if cfg["do_layer_norm_before"] and not cfg.get("_remove_final_layer_norm", False):
        ln(D + "final_layer_norm")

    _write_json(folder / "config.json", cfg)
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": cfg["bos_token_id"],
            "eos_token_id": cfg["eos_token_id"],
            "pad_token_id": cfg["pad_token_id"],
        },
    )
    _save(folder, t)
    write_tokenizer(folder, kind="opt", vocab_size=V, model_max_length=cfg["max_position_embeddings"])
    return folder


# --------------------------------------------------------------------------
# tokenizer (byte-level BPE, GPT-2 style)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A flash memory chip holds the
weights of a large language model, and only the neurons that are needed for the
next token are read into memory. The model predicts which neurons will be
active, keeps the recent ones in a window, and bundles rows and columns so that
one read fetches a whole neuron. This is how a model that does not fit in the
memory of a phone or a laptop can still run at a useful speed.
Hello world! How are you today? I am fine, thank you. What is the weather like
in the city? It is sunny and warm, with a light wind from the west.
Once upon a time there was a little girl who lived in a village near the forest.
Whenever she went out, she wore a red riding cloak, so everyone in the village
called her Little Red Riding Hood. One morning her mother said to her: take this
basket of bread and butter to your grandmother, who is ill.
def main(): print("hello, world") return 0 # numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024
for i in range(10): x = x + i * 2 if x > 3 else x - 1
The attention layers and the embeddings stay in memory while the feed forward
layers live on the storage device. Sparsity after the ReLU activation is high:
most of the neurons are zero for any given token, and their weights are not
needed at all. Windowing, bundling and a low rank predictor reduce the data that
has to be loaded for every new token.
"""

_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable unicode char map (as tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _learn_merges(n_merges: int) -> list:
    """Plain BPE on _CORPUS; ties broken lexicographically -> deterministic."""
    b2u = _bytes_to_unicode()
    words = Counter(
        tuple(b2u[b] for b in w.encode("utf-8")) for w in _SPLIT.findall(_CORPUS)
    )
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        new_words = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return merges


_TOKENIZER_KINDS = {
    # leading specials (ids 0..), bos, eos, unk, pad
    "llama": (["<unk>", "<s>", "</s>"], "<s>", "</s>", "<unk>", None),
    # OPT (GPT-2 BPE): <s>=0 <pad>=1 </s>=2 <unk>=3; bos = eos = "</s>"
    "opt": (["<s>", "<pad>", "</s>", "<unk>"], "</s>", "</s>", "<unk>", "<pad>"),
}


def write_tokenizer(folder, *, kind: str = "llama", vocab_size: int = 512, model_max_length: int = 256) -> None:
    """Write tokenizer.json + tokenizer_config.json (byte-level BPE).

    Layout: leading specials (per ``kind``), the 256 byte tokens, BPE merges
    learned on a fixed corpus, then ``<|im_start|>``/``<|im_end|>``; merges
    fill the vocabulary up to exactly ``vocab_size`` when the corpus allows.
    The post-processor prepends bos (Llama ``<s>``; OPT ``</s>``, as HF's OPT).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    folder = Path(folder)
    lead, bos, eos, unk, pad = _TOKENIZER_KINDS[kind]
    b2u = _bytes_to_unicode()
    n_fixed = len(lead) + 256 + len(_CHAT_SPECIALS)
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size {vocab_size} < {n_fixed} (specials + 256 bytes)")
    merges = _learn_merges(vocab_size - n_fixed)

    vocab = {}
    for s in lead:
        vocab[s] = len(vocab)
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    chat_ids = {s: len(vocab) + i for i, s in enumerate(_CHAT_SPECIALS)}
    vocab.update(chat_ids)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, vocab[bos])],
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in lead + _CHAT_SPECIALS])
    tok.save(str(folder / "tokenizer.json"))

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
    }
    if pad is not None:
        tcfg["pad_token"] = pad
    tcfg.update(
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
    )
    _write_json(folder / "tokenizer_config.json", tcfg)


if __name__ == "__main__":  # python tests/tiny_models.py {relu-llama,opt} FOLDER: a checkpoint to try commands on
    import sys

    kind, out = sys.argv[1], sys.argv[2]
    made = {"relu-llama": lambda d: make_llama(d, hidden_act="relu", tie_word_embeddings=False, seed=0),
            "opt": lambda d: make_opt(d, seed=0)}
    if kind not in made:
        sys.exit(f"error: unknown kind '{kind}' (choose from {', '.join(made)})")
    made[kind](out)
    print(out)
