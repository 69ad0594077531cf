"""Golden reference values for OPT (and Llama) from Hugging Face transformers + PyTorch.

Builds tiny random models with ``tests/tiny_models.py`` (deterministic from a
seed), runs the reference implementation (``transformers.OPTForCausalLM`` /
``LlamaForCausalLM``, float32, CPU, eager attention) and writes
``tests/golden/opt_golden.json`` and ``tests/golden/llama_golden.json``.
The tests compare mlx_flash against these files without needing torch.

Reproduce (torch must NOT go into the project venv; use a separate one)::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch transformers safetensors numpy tokenizers
    /tmp/refenv/bin/python tests/golden/make_opt_golden.py

Versions used for the committed files (also recorded inside the JSON):
Python 3.11.7, torch 2.15.0 (+cu132 wheel from PyPI, run on CPU), transformers 5.24.0, tokenizers 0.23.3,
safetensors 0.8.0, numpy 2.4.6 (Linux x86_64, CPU).

JSON schema (both files)::

    {
      "generator": "tests/golden/make_opt_golden.py",
      "versions": {"python", "torch", "transformers", "tokenizers", "safetensors", "numpy"},
      "notes": [str, ...],
      "variants": {
        NAME: {
          "maker": "make_opt" | "make_llama",
          "kwargs": {...},              # exact call: maker(folder, **kwargs)
          "config": {...},              # the config.json written
          "safetensors_sha256": hex,    # of model.safetensors (checks determinism)
          "input_ids": [int] * T,       # batch 1, T = 12, no padding
          "logits_shape": [T, V],
          "logits_last": {"positions": [T-3, T-2, T-1],
                          "values": [[float] * V] * 3},   # 6 significant digits
          "logits_sum": [float] * T,    # per position, sum over vocab
          "logits_abs_sum": [float] * T,
          "logits_sum_total": float, "logits_abs_sum_total": float,
          "argmax": [int] * T,          # per position
          "residual_sum": [float] * (L+1),      # input of layer 0, output of
          "residual_abs_sum": [float] * (L+1),  # layer 0..L-1 (all positions)
          "ffn_active_fraction": [float] * L,   # mean over tokens of share of
          "ffn_active_fraction_min": [float] * L,   # FFN neurons > 0 (OPT: fc1
          "ffn_active_fraction_max": [float] * L,   # output; Llama: gate_proj)
          "greedy": {"max_new_tokens": 8,
                     "tokens": [int] * 8,       # generate(do_sample=False), KV cache
                     "tokens_no_cache": [int] * 8,  # full recompute each step
                     "top2_margins": [float] * 8,   # logit gap top1 - top2 per step
                     "text": str}               # decoded continuation
        }
      }
    }

All floats are float32 results rounded to 6 significant digits. ``generate``
runs with ``eos_token_id=None`` so that exactly 8 tokens are produced even if
eos (id 2) wins; position ids are 0..T-1 (OPT reads embed_positions rows 2..T+1).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM, OPTForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import tiny_models  # noqa: E402

PROMPT = "Once upon a time there was a little girl who lived in a village"
T = 12
NEW = 8

OPT_VARIANTS = {
    "opt_pre_ln": dict(do_layer_norm_before=True, seed=0),
    "opt_post_ln": dict(do_layer_norm_before=False, seed=0),
    "opt_proj": dict(do_layer_norm_before=True, word_embed_proj_dim=32, seed=0),
    # opt-350m geometry: post-LN *and* project_in/out
    "opt_post_ln_proj": dict(do_layer_norm_before=False, word_embed_proj_dim=32, seed=0),
}
LLAMA_VARIANTS = {
    "llama_relu_untied": dict(hidden_act="relu", tie_word_embeddings=False, seed=0),
    "llama_silu_tied": dict(hidden_act="silu", tie_word_embeddings=True, seed=0),
}


def r6(x) -> float:
    return float(f"{float(x):.6g}")


def r6list(a) -> list:
    return [r6(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def load(cls, folder):
    try:
        return cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    except TypeError:  # older transformers
        return cls.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").eval()


def check_loaded_exactly(model, folder: Path) -> None:
    """Every tensor in the file must be used unchanged (no silent re-init)."""
    from safetensors.numpy import load_file

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for k, v in load_file(str(folder / "model.safetensors")).items():
        assert k in sd, f"{k} not in model"
        assert np.array_equal(sd[k], v), f"{k} differs after loading"
    if model.config.tie_word_embeddings:
        emb = model.get_input_embeddings().weight
        assert model.lm_head.weight.data_ptr() == emb.data_ptr(), "lm_head not tied"


def run_variant(name: str, maker_name: str, kwargs: dict, root: Path) -> dict:
    folder = root / name
    getattr(tiny_models, maker_name)(folder, **kwargs)
    cls = OPTForCausalLM if maker_name == "make_opt" else LlamaForCausalLM
    model = load(cls, folder)
    check_loaded_exactly(model, folder)
    tok = AutoTokenizer.from_pretrained(folder)

    ids = tok(PROMPT)["input_ids"][:T]
    assert len(ids) == T, ids
    x = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(x)

    # hooks: residual stream and FFN activity
    layers = model.model.decoder.layers if maker_name == "make_opt" else model.model.layers
    resid, active = [], []

    def pre_hook(mod, args, kwargs_):
        if not resid:
            h = args[0] if args else kwargs_["hidden_states"]
            resid.append(h.detach().clone())

    def post_hook(mod, args, kwargs_, out):
        h = out[0] if isinstance(out, tuple) else out
        resid.append(h.detach().clone())

    def ffn_hook(mod, args, out):
        active.append((out.detach() > 0).float().reshape(-1, out.shape[-1]).mean(-1))

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    for lyr in layers:
        handles.append(lyr.register_forward_hook(post_hook, with_kwargs=True))
        ffn = lyr.fc1 if maker_name == "make_opt" else lyr.mlp.gate_proj
        handles.append(ffn.register_forward_hook(ffn_hook))
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits[0].numpy()
    for h in handles:
        h.remove()
    L = len(layers)
    assert len(resid) == L + 1 and len(active) == L

    # greedy, with KV cache (generate) and without (full recompute)
    gcfg = GenerationConfig(
        max_new_tokens=NEW, min_new_tokens=0, do_sample=False, use_cache=True,
        eos_token_id=None, pad_token_id=model.config.pad_token_id,
        bos_token_id=model.config.bos_token_id,
    )
    model.generation_config.eos_token_id = None  # else generate() falls back to it
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, generation_config=gcfg)
    gen = out[0, T:].tolist()
    seq, margins, nocache = list(ids), [], []
    with torch.no_grad():
        for _ in range(NEW):
            lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].numpy()
            top = np.sort(lg)[-2:]
            margins.append(float(top[1] - top[0]))
            nxt = int(lg.argmax())
            nocache.append(nxt)
            seq.append(nxt)
    assert gen == nocache, (gen, nocache)

    V = logits.shape[1]
    return {
        "maker": maker_name,
        "kwargs": kwargs,
        "config": json.loads((folder / "config.json").read_text()),
        "safetensors_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
        "input_ids": ids,
        "logits_shape": [T, V],
        "logits_last": {
            "positions": [T - 3, T - 2, T - 1],
            "values": [r6list(logits[p]) for p in range(T - 3, T)],
        },
        "logits_sum": r6list(logits.astype(np.float64).sum(1)),
        "logits_abs_sum": r6list(np.abs(logits.astype(np.float64)).sum(1)),
        "logits_sum_total": r6(logits.astype(np.float64).sum()),
        "logits_abs_sum_total": r6(np.abs(logits.astype(np.float64)).sum()),
        "argmax": logits.argmax(1).tolist(),
        "residual_sum": [r6(h.double().sum()) for h in resid],
        "residual_abs_sum": [r6(h.double().abs().sum()) for h in resid],
        "ffn_active_fraction": [r6(a.mean()) for a in active],
        "ffn_active_fraction_min": [r6(a.min()) for a in active],
        "ffn_active_fraction_max": [r6(a.max()) for a in active],
        "greedy": {
            "max_new_tokens": NEW,
            "tokens": gen,
            "tokens_no_cache": nocache,
            "top2_margins": [r6(m) for m in margins],
            "text": tok.decode(gen),
        },
    }


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "platform": f"{platform.system()} {platform.machine()}",
    }


NOTES_OPT = [
    "OPTForCausalLM, float32, CPU, attn_implementation=eager, batch 1, no padding.",
    "embed_positions has max_position_embeddings + 2 rows; token at position p uses row p + 2.",
    "post-LN (do_layer_norm_before=False): LayerNorm after each residual add, no decoder final_layer_norm.",
    "project_in (word_embed_proj_dim -> hidden) is applied to token embeddings before adding positions; "
    "project_out (hidden -> word_embed_proj_dim) after the optional final norm; both without bias.",
    "lm_head is tied to model.decoder.embed_tokens.weight and absent from model.safetensors.",
    "q is scaled by head_dim**-0.5 after adding q_proj.bias.",
]
NOTES_LLAMA = [
    "LlamaForCausalLM, float32, CPU, attn_implementation=eager, batch 1, no padding.",
    "ffn_active_fraction counts gate_proj outputs > 0 (for relu = neurons with nonzero act(gate)).",
]


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for fname, maker, variants, notes in [
            ("opt_golden.json", "make_opt", OPT_VARIANTS, NOTES_OPT),
            ("llama_golden.json", "make_llama", LLAMA_VARIANTS, NOTES_LLAMA),
        ]:
            doc = {
                "generator": "tests/golden/make_opt_golden.py",
                "versions": versions(),
                "notes": notes,
                "variants": {name: run_variant(name, maker, kw, root) for name, kw in variants.items()},
            }
            path = HERE / fname
            path.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {path} ({path.stat().st_size} bytes)")
            for name, v in doc["variants"].items():
                print(
                    f"  {name}: argmax={v['argmax']} greedy={v['greedy']['tokens']} "
                    f"min_margin={min(v['greedy']['top2_margins']):.3g} "
                    f"active={v['ffn_active_fraction']} "
                    f"(min {v['ffn_active_fraction_min']}, max {v['ffn_active_fraction_max']})"
                )


if __name__ == "__main__":
    main()
