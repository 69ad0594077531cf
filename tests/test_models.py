"""Tiny random models of every architecture: reference agreement, conversion round trip, KV cache."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash.load import load

GOLDEN = Path(__file__).parent / "golden"
OPT_GOLDEN = json.loads((GOLDEN / "opt_golden.json").read_text())["variants"]
LLAMA_GOLDEN = json.loads((GOLDEN / "llama_golden.json").read_text())["variants"]
NAMES = ["llama_silu_tied", "llama_relu_untied", "opt_pre_ln", "opt_post_ln", "opt_proj"]


def logits(model, ids):
    return model(mx.array(ids)[None])[0].astype(mx.float32)


def greedy(model, ids, n):
    """Greedy decoding with a KV cache: prompt pass, then one token at a time."""
    cache = make_prompt_cache(model)
    out = model(mx.array(ids)[None], cache=cache)
    toks = []
    for _ in range(n):
        t = out[0, -1].argmax().item()
        toks.append(t)
        out = model(mx.array([[t]]), cache=cache)
    return toks


@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_implementation(tiny_model, name):
    """Golden values from Hugging Face transformers (tests/golden/make_opt_golden.py)."""
    gold = {**OPT_GOLDEN, **LLAMA_GOLDEN}[name]
    model, _ = load(str(tiny_model(name)))
    out = logits(model, gold["input_ids"])
    assert list(out.shape) == gold["logits_shape"]
    pos = gold["logits_last"]["positions"]
    np.testing.assert_allclose(np.array(out[mx.array(pos)]), np.array(gold["logits_last"]["values"]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(out.sum(-1)), gold["logits_sum"], rtol=1e-4, atol=1e-3)
    assert np.array(out.argmax(-1)).tolist() == gold["argmax"]
    g = gold["greedy"]
    assert greedy(model, gold["input_ids"], g["max_new_tokens"]) == g["tokens"]


@pytest.mark.parametrize("name", NAMES)
def test_convert_roundtrip_dense_equals_source(tiny_model, tiny_flash, name):
    ids = list(range(3, 40, 3))
    src, _ = load(str(tiny_model(name)))
    conv, _ = load(str(tiny_flash(name)), mode="dense")
    np.testing.assert_allclose(np.array(logits(conv, ids)), np.array(logits(src, ids)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama_silu_tied", "opt_pre_ln"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_float_dtypes(tiny_model, tiny_flash, name, dtype):
    ids = list(range(5, 29, 2))
    src, _ = load(str(tiny_model(name)))
    conv, _ = load(str(tiny_flash(name, dtype=dtype)), mode="dense")
    a, b = np.array(logits(conv, ids)), np.array(logits(src, ids))
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_quantized_measures_requantization(tiny_model, tiny_flash, bits):
    folder = tiny_flash("llama_relu_untied", quantize=bits, group_size=32)
    cfg = json.loads((folder / "flash.json").read_text())
    assert cfg["ffn"]["quantization"]["bits"] == bits
    err = cfg["source"]["requantization"]["down_relative_error_mean"]
    assert 0 < err < (0.2 if bits == 4 else 0.02)
    src, _ = load(str(tiny_model("llama_relu_untied")))
    conv, _ = load(str(folder), mode="dense")
    ids = list(range(7, 40, 3))
    a, b = np.array(logits(conv, ids)), np.array(logits(src, ids))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > (0.9 if bits == 4 else 0.999)


@pytest.mark.parametrize("name", ["llama_silu_tied", "llama_relu_untied", "opt_pre_ln", "opt_proj"])
def test_resident_layouts_store_the_same_model(tiny_model, tiny_flash, name):
    """--resident-layout in-out stores attention and the LM head (in, out) for MLX's CPU kernel: the
    quantized model answers like the out-in one (each quantized from the float source once), a tied
    embedding's lookup reads exactly the stored (d_model, vocab) values, and flash.json says which."""
    from mlx_flash.models.in_out import InOutEmbedding, InOutLinear

    ids = list(range(7, 40, 3))
    src, _ = load(str(tiny_model(name)))
    ref = np.array(logits(src, ids))
    got = {}
    for layout in ("out-in", "in-out"):
        folder = tiny_flash(name, quantize=4, group_size=32, resident_layout=layout)
        q = json.loads((folder / "flash.json").read_text())["model_config"]["quantization"]
        model, _ = load(str(folder), mode="dense")
        mods = dict(model.named_modules())
        in_out = [p for p, m in mods.items() if isinstance(m, (InOutLinear, InOutEmbedding))]
        assert sorted(in_out) == sorted(q.get("in_out", []))
        if layout == "in-out":
            attn = [p for p in in_out if ".self_attn." in p]
            assert len(attn) == 4 * len(model.layers)
            head = "lm_head" if "lm_head" in mods else next(p for p in in_out if p.endswith("embed_tokens"))
            assert head in in_out
            q_proj = mods[attn[0]]  # computes x @ W exactly with its stored W
            w = mx.dequantize(q_proj.weight, q_proj.scales, q_proj.biases, group_size=32, bits=4)  # (in, out)
            x = mx.random.normal((2, w.shape[0]))
            b = q_proj.bias if "bias" in q_proj else 0
            np.testing.assert_allclose(np.array(q_proj(x)), np.array(x @ w + b), rtol=1e-4, atol=1e-4)
            if isinstance(mods[head], InOutEmbedding):
                e = mods[head]
                table = mx.dequantize(e.weight, e.scales, e.biases, group_size=32, bits=4).T  # (vocab+pad, d)
                tok = mx.array([0, 1, 31, 32, e.num_embeddings - 1])
                np.testing.assert_array_equal(np.array(e(tok)), np.array(table[tok]))
        else:
            assert in_out == []
        got[layout] = np.array(logits(model, ids))
        assert got[layout].shape == ref.shape
    # 4 bits on a tiny random model: each layout ~0.93-0.97 correlated with the float source, neither worse
    corr = {k: np.corrcoef(v.ravel(), ref.ravel())[0, 1] for k, v in got.items()}
    assert min(corr.values()) > 0.9 and abs(corr["in-out"] - corr["out-in"]) < 0.03, corr


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_incremental_equals_full_forward(tiny_flash, name):
    model, _ = load(str(tiny_flash(name)), mode="dense")
    ids = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64]
    full = logits(model, ids)
    cache = make_prompt_cache(model)
    steps = [model(mx.array([ids[:4]]), cache=cache)[0]]
    for t in ids[4:]:
        steps.append(model(mx.array([[t]]), cache=cache)[0])
    inc = mx.concatenate(steps, axis=0).astype(mx.float32)
    np.testing.assert_allclose(np.array(inc), np.array(full), rtol=1e-4, atol=1e-4)


def test_hub_id_downloads_with_huggingface_hub(tiny_model, monkeypatch):
    """The Hub is unreachable here: check the code path with snapshot_download standing in."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tiny_model("opt_pre_ln"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, tok = load("facebook/opt-tiny")
    assert calls and calls[0][0] == "facebook/opt-tiny" and "*.safetensors" in calls[0][1]
    assert logits(model, [1, 2, 3]).shape == (3, 512)
