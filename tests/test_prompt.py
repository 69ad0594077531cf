"""Prompt mode (flash.prompt): a prompt over every bundle of each layer, read once in sequential slices.

It computes every neuron, so its logits are dense's whatever the predictors say; the windows it leaves
hold the neurons predicted for its last tokens; auto mode picks it only where window steps would read
more than one pass; the bytes read are one pass per layer, through the planned staging area."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from flash_fixtures import decode
from mlx_flash.errors import FlashError
from mlx_flash.flash import sparsity
from mlx_flash.format import BUNDLES_FILE, FlashConfig, layer_view
from mlx_flash.generate import stream
from mlx_flash.load import load

IDS = np.random.default_rng(1).integers(3, 500, 96).tolist()


@pytest.mark.parametrize("name, convert_options", [
    ("llama_silu_tied", {}), ("llama_silu_tied", {"quantize": 4}), ("opt_pre_ln", {}),
    ("llama_relu_untied", {"quantize": 4})], ids=["glu", "glu-q4", "relu-opt", "relu-llama-q4"])
def test_prompt_pass_equals_dense(trained_flash, name, convert_options, monkeypatch):
    """With the trained predictors (which miss neurons) and windows smaller than the FFN: the prompt's
    logits are dense's, and it read every bundle of every layer once. On MLX's CPU backend the slices
    multiply in numpy, dequantized in blocks of rows: blocks of 5 rows here, so that a slice ends
    within one."""
    monkeypatch.setattr(sparsity, "FLOAT_BLOCK_BYTES", 5 * 3 * 4 * 64)
    folder = trained_flash(name, convert_options)
    cfg = FlashConfig.load(folder)
    dense, _ = load(str(folder), mode="dense")
    flash, _ = load(str(folder), mode="flash", prompt_mode="pass", slots=cfg.d_ff // 4)
    want, _ = decode(dense, IDS, 0)
    got, _ = decode(flash, IDS, 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    s = flash.flash_stats.snapshot()
    assert s["prompt_mode"] == "pass" and s["prompt_passes"] == cfg.n_layers
    assert s["prompt_bytes_read"] == cfg.n_layers * cfg.d_ff * cfg.layout.stride
    assert s["bytes_read_per_token"] == 0  # no decode yet


def test_windows_after_a_prompt_hold_its_last_tokens_neurons(trained_flash):
    """Each layer's window is the union of what its predictor named for the prompt's last `window`
    tokens (best first when more than the rows), copied from the slices: decoding starts warm, and
    with an exact predictor the whole generation is dense's."""
    folder = trained_flash("llama_relu_untied")
    cfg = FlashConfig.load(folder)
    dense, _ = load(str(folder), mode="dense")
    seen = {}

    def exact(l, f):
        def predict(x):
            s = mx.abs(f(x))
            seen[l] = np.array(s)  # the latest call's scores: (N, d_ff)
            return s
        return predict

    oracle = [exact(l, layer.mlp.activations) for l, layer in enumerate(dense.layers)]
    flash, _ = load(str(folder), mode="flash", prompt_mode="pass", predictor=oracle, window=3)
    flash(mx.array(IDS)[None], cache=make_prompt_cache(flash))
    assert flash.flash_stats.snapshot()["prompt_mode"] == "pass"
    data = np.fromfile(folder / BUNDLES_FILE, dtype=np.uint8)
    for l, layer in enumerate(flash.layers):
        want = np.flatnonzero((seen[l][-3:] > 0).any(axis=0))
        want = np.setdiff1d(want, flash.flash_plan.pinned[l])
        c = layer.mlp.cache
        if len(want) <= c.slots:
            assert np.array_equal(np.sort(c.resident), want)
        # the rows hold those neurons' bundles, byte for byte as on disk
        disk = layer_view(data, cfg, l)[c.resident.astype(np.int64)]
        row = c.buffer.rows(c.n)
        assert np.array_equal(row, np.concatenate([disk[:, f.offset:f.offset + f.nbytes] for f in cfg.layout.fields],
                                                  axis=1))
    flash2, _ = load(str(folder), mode="flash", prompt_mode="pass", predictor=oracle, window=3)
    want, want_toks = decode(dense, IDS, 8)
    got, got_toks = decode(flash2, IDS, 8)
    assert got_toks == want_toks
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    s = flash2.flash_stats.snapshot()
    assert s["decode_tokens"] == 8 and s["bytes_read_per_token"] < cfg.n_layers * cfg.d_ff * cfg.layout.stride


def test_auto_mode_passes_only_where_window_steps_would_read_more(trained_flash):
    """Auto: a prompt whose window steps would read more than the layer's FFN runs as one pass; a short
    one runs as window steps, as before."""
    folder = trained_flash("opt_pre_ln")
    cfg = FlashConfig.load(folder)
    small = cfg.d_ff // 8  # windows of 1/8 of the FFN: a long prompt's groups read it several times over
    model, _ = load(str(folder), mode="flash", slots=small)
    decode(model, IDS, 0)
    s = model.flash_stats.snapshot()
    assert s["prompt_mode"] == "pass" and s["prompt_bytes_read"] == cfg.n_layers * cfg.d_ff * cfg.layout.stride
    steps, _ = load(str(folder), mode="flash", slots=small, prompt_mode="window")
    decode(steps, IDS, 0)
    w = steps.flash_stats.snapshot()
    assert w["prompt_mode"] == "window steps" and w["prompt_bytes_read"] > s["prompt_bytes_read"]
    short, _ = load(str(folder), mode="flash", slots=small)
    decode(short, IDS[:2], 0)
    assert short.flash_stats.snapshot()["prompt_mode"] == "window steps"
    with pytest.raises(FlashError, match="prompt-mode"):
        load(str(folder), mode="flash", prompt_mode="all")


def test_prompt_pass_within_the_budget(trained_flash):
    """The pass reads through the staging area the plan already counts: a long prompt in pass mode stays
    within the smallest budget the plan accepts."""
    folder = trained_flash("llama_relu_untied")
    probe, _ = load(str(folder), mode="flash", max_kv_size=200, prefill_step=100)
    budget = probe.flash_plan.total
    probe.flash_reader.close()
    del probe
    gc.collect()
    model, tok = load(str(folder), mode="flash", dram_budget=budget, max_kv_size=200, prefill_step=100,
                      prompt_mode="pass")
    out = list(stream(model, tok, IDS + IDS[:84], max_tokens=8))
    assert out[-1].flash["prompt_passes"] == 2 * FlashConfig.load(folder).n_layers  # two chunks of 100
    assert mx.get_peak_memory() <= budget, (mx.get_peak_memory(), budget)


def test_the_planned_chunk_follows_the_budget(trained_flash):
    """By default the prompt chunk is the longest that leaves the windows their rows: up to the context
    with room to spare, shorter chunks (not a refusal) when 128 tokens' working memory does not fit."""
    folder = trained_flash("llama_relu_untied")
    roomy, _ = load(str(folder), mode="flash", max_kv_size=300)
    assert roomy.flash_plan.prefill_step == 300  # the whole context: one chunk
    roomy.flash_reader.close()
    fixed, _ = load(str(folder), mode="flash", max_kv_size=300, prefill_step=128, slots=64)
    tight = fixed.flash_plan.total - 1  # a byte short of 128 tokens' working memory and 64-row windows
    fixed.flash_reader.close()
    small, _ = load(str(folder), mode="flash", max_kv_size=300, dram_budget=tight, slots=64)
    assert small.flash_plan.prefill_step < 128 and small.flash_plan.total <= tight
    with pytest.raises(FlashError):
        load(str(folder), mode="flash", max_kv_size=300, dram_budget=tight, slots=64, prefill_step=128)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_numpy_dequantize_is_mlxs(bits):
    """A prompt's numpy matmuls unpack 4- and 8-bit weights in numpy (other widths by MLX): the same floats
    as MLX's dequantize, from a packed strided view as the bundles hold them."""
    w = mx.random.normal((48, 256), key=mx.random.key(bits))
    q, s, b = mx.quantize(w, 64, bits)
    want = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits))
    np.testing.assert_array_equal(sparsity.dequantize(q, s.astype(mx.float16), b.astype(mx.float16), 64, bits),
                                  np.array(mx.dequantize(q, s.astype(mx.float16).astype(mx.float32),
                                                         b.astype(mx.float16).astype(mx.float32),
                                                         group_size=64, bits=bits)))
    np.testing.assert_array_equal(sparsity.dequantize(q[::2], s[::2], b[::2], 64, bits), want[::2])
