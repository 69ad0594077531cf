"""Flash mode on tiny models: exactness with an oracle, bytes read, fixed buffers, budget, corruption."""

import gc
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from flash_fixtures import decode
from mlx_flash.errors import FlashError
from mlx_flash.format import BUNDLES_FILE, FlashConfig, layer_view
from mlx_flash.generate import stream
from mlx_flash.load import load, load_flash

RELU = ["llama_relu_untied", "opt_pre_ln", "opt_post_ln"]
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 81, 200]


def oracle(folder):
    """Per layer: the true activations as scores, so `score > 0` is exactly the active set."""
    dense, _ = load_flash(folder, "dense")
    return [lambda x, f=layer.mlp.activations: mx.abs(f(x)) for layer in dense.layers]


@pytest.mark.parametrize("name", RELU)
@pytest.mark.parametrize("window", [1, 3])
def test_oracle_flash_equals_dense_for_relu(trained_flash, name, window):
    folder = trained_flash(name)
    dense, _ = load(str(folder), mode="dense")
    flash, _ = load(str(folder), mode="flash", predictor=oracle(folder), window=window)
    want, want_toks = decode(dense, PROMPT, 12)
    got, got_toks = decode(flash, PROMPT, 12)
    assert got_toks == want_toks
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    s = flash.flash_stats.snapshot()
    assert s["decode_tokens"] == 12 and 0 < s["ffn_share_read"] < 1
    assert s["truncations"] == 0


def test_bytes_read_are_the_new_bundles(trained_flash):
    folder = trained_flash("opt_pre_ln")
    cfg = FlashConfig.load(folder)
    model, _ = load(str(folder), mode="flash", window=3)
    reader, layer0 = model.flash_reader, model.layers[0].mlp
    seen = []
    orig_step = layer0.cache.step

    def step(active):  # record what the cache asks for, then compare with what the reader read
        new, start = orig_step(active)
        seen.append(len(new))
        return new, start

    layer0.cache.step = step
    decode(model, PROMPT[:1], 10)
    s = model.flash_stats
    assert s.bytes_read == s.bytes_requested == s.bundles * cfg.layout.stride
    assert reader.stats.bytes_read == reader.stats.bundles * cfg.layout.stride
    # every token: only neurons not already in the window were read
    new_total = sum(l.mlp.cache.stats.new_neurons for l in model.layers)
    assert reader.stats.bundles == new_total
    assert sum(seen) == layer0.cache.stats.new_neurons
    assert layer0.cache.stats.new_neurons < layer0.cache.stats.steps * cfg.d_ff


def test_buffers_never_reallocated_and_invariants_hold(trained_flash):
    folder = trained_flash("llama_relu_untied")
    model, tok = load(str(folder), mode="flash", window=2)
    before = [(l.mlp.buffer.addresses, l.mlp.buffer.slots) for l in model.layers]
    list(stream(model, tok, "hello there, how are you", max_tokens=20))
    assert [(l.mlp.buffer.addresses, l.mlp.buffer.slots) for l in model.layers] == before
    cfg = FlashConfig.load(folder)
    data = np.fromfile(folder / BUNDLES_FILE, dtype=np.uint8)
    for i, l in enumerate(model.layers):
        c = l.mlp.cache
        res = c.resident
        assert len(set(res.tolist())) == len(res) == c.n <= c.slots
        assert (c.neuron_to_slot[res] == np.arange(c.n)).all()
        # row r holds exactly neuron res[r]'s fields as stored on disk
        on_disk = layer_view(data, cfg, i)[res]
        packed = np.concatenate([on_disk[:, f.offset : f.offset + f.nbytes] for f in cfg.layout.fields], axis=1)
        np.testing.assert_array_equal(l.mlp.buffer.rows(c.n), packed)


def test_small_buffers_shrink_the_window_and_still_run(trained_flash):
    folder = trained_flash("opt_pre_ln")
    model, tok = load(str(folder), mode="flash", window=8, slots=40)
    out = list(stream(model, tok, "abc", max_tokens=10))
    assert len(out) == 10
    s = model.flash_stats.snapshot()
    assert s["window_shrinks"] > 0


def test_trained_predictors_report(trained_flash):
    folder = trained_flash("opt_pre_ln")
    p = FlashConfig.load(folder).predictors
    assert p["kind"] == "relu" and p["activation_threshold"] == [0.0, 0.0]
    assert all(0.8 <= r <= 1.0 for r in p["recall"])
    assert all(0 < s < 1 for s in p["predicted_share"])
    assert all(w <= 256 for w in p["window_union_p99"])
    assert (folder / p["file"]).is_file()


@pytest.mark.parametrize("name, convert_options", [
    ("llama_silu_tied", {}), ("opt_pre_ln", {}), ("llama_silu_tied", {"quantize": 4, "resident_layout": "in-out"}),
    ("llama_relu_untied", {"quantize": 4, "resident_layout": "out-in"})], ids=["silu", "opt", "q4-in-out", "q4-out-in"])
def test_numpy_calibration_pass_is_mlxs(tiny_flash, monkeypatch, name, convert_options):
    """On MLX's CPU backend the calibration pass multiplies in numpy (sparsity.record_layers): the same
    FFN inputs and activations as MLX's, and the model's linears are its own again after it."""
    from mlx_flash.flash import sparsity
    from mlx_flash.load import LayerLoader, load_resident
    from mlx_flash.sources import load_tokenizer

    folder = tiny_flash(name, **convert_options)
    cfg = FlashConfig.load(folder)
    windows = sparsity.token_windows(load_tokenizer(folder), "The quick brown fox jumps over the lazy dog. " * 40,
                                     96, 32)
    model, down_bias = load_resident(folder, cfg)
    linears = [type(m).__name__ for _, m in model.layers[0].named_modules()]
    seen = {}
    for numpy in (True, False):
        monkeypatch.setattr(sparsity, "numpy_is_faster", lambda: numpy)
        loader = LayerLoader(folder, cfg, model.ffn_spec, down_bias)
        got = seen[numpy] = []
        sparsity.record_layers(model, windows, loader, lambda a: got.append((a.x, a.h, a.y_norm)), chunk=40)
        loader.close()
        assert [type(m).__name__ for _, m in model.layers[0].named_modules()] == linears
    for (x, h, y), (x0, h0, y0) in zip(seen[True], seen[False]):
        np.testing.assert_allclose(x.astype(np.float32), x0.astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(h.astype(np.float32), h0.astype(np.float32), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(y, y0, rtol=1e-4)


@pytest.mark.parametrize("weight", ["contribution", "count"])
def test_numpy_training_is_mlxs(monkeypatch, weight):
    """On MLX's CPU backend the predictors train in numpy (flash.predictor): the same initial weights,
    batches, loss and AdamW steps as MLX's, so the same weights and thresholds."""
    from mlx_flash.flash import predictor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 32)).astype(np.float16)
    h = np.abs(x.astype(np.float32) @ rng.standard_normal((32, 96)) + rng.standard_normal((400, 96)))
    y = h > np.median(h)
    trained = {}
    for numpy in (True, False):
        monkeypatch.setattr(predictor, "numpy_is_faster", lambda: numpy)
        trained[numpy] = predictor.train_layer(x, y, 8, epochs=3, batch=64, contribution=h.astype(np.float32),
                                               weight=weight)
    (p, reports), (p0, reports0) = trained[True], trained[False]
    for a, b in zip((p.down.weight, p.up.weight, p.up.bias), (p0.down.weight, p0.up.weight, p0.up.bias)):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    assert reports.keys() == reports0.keys()
    for r in reports:
        assert abs(reports[r].tau - reports0[r].tau) < 1e-4 and abs(reports[r].recall - reports0[r].recall) < 1e-3


def test_threshold_sparsity_for_glu(trained_flash):
    folder = trained_flash("llama_silu_tied", sparsity=0.6)
    p = FlashConfig.load(folder).predictors
    assert p["kind"] == "threshold" and p["sparsity_target"] == 0.6
    assert all(abs(s - 0.4) < 0.05 for s in p["true_share"])  # calibrated on the same text
    model, tok = load(str(folder), mode="flash")
    assert len(list(stream(model, tok, "hi", max_tokens=5))) == 5


def test_generate_flash_cli_reports_reads(trained_flash):
    folder = trained_flash("opt_pre_ln")
    p = subprocess.run([sys.executable, "-m", "mlx_flash.generate", "--model", str(folder), "--mode", "flash",
                        "-p", "hello", "--max-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    mb = float(p.stderr.split("|")[-1].split("MB")[0])
    assert mb > 0


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "mlx_flash.generate", *args], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stderr


def test_budget_too_small_is_refused(trained_flash):
    rc, err = run_cli("--model", str(trained_flash("opt_pre_ln")), "--mode", "flash", "--dram-budget", "10K")
    assert rc != 0 and "Traceback" not in err
    assert err.strip().startswith("error: a DRAM budget of 0.0 MB cannot hold") and len(err.strip().splitlines()) == 1


def test_corrupted_bundle_detected_when_read(trained_flash, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(trained_flash("opt_pre_ln"), folder)
    cfg = FlashConfig.load(folder)
    with open(folder / BUNDLES_FILE, "r+b") as f:  # every neuron of layer 0 gets one flipped byte
        for i in range(cfg.d_ff):
            f.seek(cfg.bundle_offset(0, i) + 10)
            b = f.read(1)
            f.seek(cfg.bundle_offset(0, i) + 10)
            f.write(bytes([b[0] ^ 0x55]))
    rc, err = run_cli("--model", str(folder), "--mode", "flash", "-p", "hi", "--max-tokens", "2")
    assert rc != 0 and "Traceback" not in err
    assert "corrupted bundle: layer 0 neuron" in err and "checksum" in err


def test_missing_predictors_is_one_line(tiny_flash):
    rc, err = run_cli("--model", str(tiny_flash("opt_pre_ln")), "--mode", "flash")
    assert rc != 0 and "train_predictors" in err and "Traceback" not in err


def test_recall_levels_trade_reads_for_quality(trained_flash):
    folder = trained_flash("opt_pre_ln")
    levels = FlashConfig.load(folder).predictors["recall_levels"]
    shares = [np.mean(levels[k]["predicted_share"]) for k in sorted(levels, key=float)]
    assert shares == sorted(shares)  # a higher recall predicts more neurons
    low, _ = load(str(folder), mode="flash", recall=0.5)
    high, _ = load(str(folder), mode="flash", recall=0.99)
    for m in (low, high):
        decode(m, PROMPT, 6)
    assert low.flash_stats.predicted < high.flash_stats.predicted
    with pytest.raises(FlashError, match="calibrated for recall"):
        load(str(folder), mode="flash", recall=0.123)


def test_peak_memory_stays_within_the_budget(trained_flash):
    folder = trained_flash("llama_relu_untied")
    probe, _ = load(str(folder), mode="flash")
    p = probe.flash_plan
    budget = p.total  # exactly what the calibrated plan needs
    probe.flash_reader.close()
    del probe  # its arrays would count in MLX's active memory
    gc.collect()
    model, tok = load(str(folder), mode="flash", dram_budget=budget)
    assert model.flash_plan.total <= budget
    list(stream(model, tok, "a budget is a budget", max_tokens=16))
    assert mx.get_peak_memory() <= budget


@pytest.mark.parametrize("convert_options", [{}, {"quantize": 4}], ids=["float", "q4"])
def test_ffn_computes_on_the_window_without_copying_it(trained_flash, convert_options):
    """MLX's matmuls copy operands whose rows are not packed: the window's fields must be packed,
    so that a layer's compute allocates nothing in proportion to the window."""
    folder = trained_flash("llama_relu_untied", convert_options=convert_options)
    cfg = FlashConfig.load(folder)
    every = [lambda x: mx.ones((x.shape[0], cfg.d_ff)) for _ in range(cfg.n_layers)]
    model, _ = load(str(folder), mode="flash", predictor=every, slots=cfg.d_ff)
    ffn = model.layers[0].mlp
    x = mx.random.normal((1, 1, cfg.d_model))
    mx.eval(x, ffn(x))  # the first token reads every neuron
    mx.eval(ffn(x))
    gc.collect()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    y = ffn(x)
    mx.eval(y)
    assert ffn.cache.n == cfg.d_ff and ffn.cache.stats.last_new == 0
    window = ffn.buffer.nbytes
    assert mx.get_peak_memory() - base < window / 8, (mx.get_peak_memory() - base, window)
    # and it is the FFN over every neuron: the dense layer's output
    dense, _ = load_flash(folder, "dense")
    np.testing.assert_allclose(np.array(y), np.array(dense.layers[0].mlp(x)), rtol=1e-4, atol=1e-4)


def test_decode_syncs_once_per_layer(trained_flash, monkeypatch):
    """Without profiling, a decode step waits for MLX once per layer: on the predictor's scores.
    (The only other eval is of the layer's previous output, already computed by then.)"""
    import sys

    from mlx_flash.flash import ffn as flash_ffn

    folder = trained_flash("llama_relu_untied")
    model, tok = load(str(folder), mode="flash")
    counts = {"host": 0, "eval": 0}
    to_host, mx_eval = flash_ffn.to_host, mx.eval

    def host(a):
        counts["host"] += 1
        return to_host(a)

    def counting_eval(*args):
        if sys._getframe(1).f_globals["__name__"] == flash_ffn.__name__:
            counts["eval"] += 1
        return mx_eval(*args)

    monkeypatch.setattr(flash_ffn, "to_host", host)
    monkeypatch.setattr(mx, "eval", counting_eval)
    out = list(stream(model, tok, "hello there", max_tokens=9))
    prompt = model.flash_stats.snapshot()["prompt_tokens"]
    n_layers, decoded = len(model.layers), model.flash_stats.decode_tokens
    assert len(out) == 9 and decoded >= 8 and prompt > 1  # mlx-lm decodes the prompt's last token, and one ahead
    assert counts["host"] == n_layers * (decoded + 1)  # one per layer for the prompt, one per decode token
    assert counts["eval"] <= n_layers * decoded


def test_long_prompt_within_the_budget_or_refused(trained_flash):
    """The plan reserves the KV cache of the whole context and a prompt chunk's working memory: a long
    prompt stays within the budget, and one beyond the reserved context is refused in one line."""
    folder = trained_flash("llama_relu_untied")
    probe, _ = load(str(folder), mode="flash", max_kv_size=300, prefill_step=64)
    budget = probe.flash_plan.total
    probe.flash_reader.close()
    del probe
    gc.collect()
    model, tok = load(str(folder), mode="flash", dram_budget=budget, max_kv_size=300, prefill_step=64)
    ids = np.random.default_rng(0).integers(3, 500, 280).tolist()  # 280 prompt tokens: 5 chunks of 64
    out = list(stream(model, tok, ids, max_tokens=16))
    assert len(out) == 16 and out[-1].prompt_tokens == 280
    assert mx.get_peak_memory() <= budget, (mx.get_peak_memory(), budget)
    with pytest.raises(FlashError, match="exceeds the 300-token context"):
        list(stream(model, tok, ids, max_tokens=40))
    rc, err = run_cli("--model", str(folder), "--mode", "flash", "--max-kv-size", "8", "-p", "one two three four "
                      "five six seven", "-m", "4")
    assert rc == 2 and err.startswith("error: ") and "8-token context" in err and len(err.splitlines()) == 1


def test_prefetch_changes_where_bytes_come_from_not_the_output(trained_flash):
    """Lookahead prefetch: the same neurons in the same rows, so the same logits; what layer l-1 read
    ahead for layer l is used (hits), the rest read then (exposed), the unneeded dropped."""
    folder = trained_flash("llama_relu_untied", lookahead=True)
    look = FlashConfig.load(folder).predictors["lookahead"]
    assert look["tau"][0] is None and all(0 < r <= 1 for r in look["recall"][1:])
    plain, _ = load(str(folder), mode="flash", prefetch=False)
    ahead, _ = load(str(folder), mode="flash", prefetch=True)
    assert ahead.flash_plan.staging == 3 * plain.flash_plan.staging  # two more staging areas, planned
    want, want_toks = decode(plain, PROMPT, 12)
    got, got_toks = decode(ahead, PROMPT, 12)
    assert got_toks == want_toks
    np.testing.assert_array_equal(got, want)
    s, p = ahead.flash_stats, plain.flash_stats
    assert s.prefetched > 0 and 0 < s.prefetch_hits <= s.needed and s.prefetch_hits + s.prefetch_wasted == s.prefetched
    assert s.needed == p.needed and s.io_exposed_s <= s.io_s
    assert s.bundles == p.bundles + s.prefetch_wasted  # what was read ahead and dropped is read in addition
    snap = s.snapshot()
    assert 0 < snap["prefetch_hit_rate"] <= 1 and 0 < snap["prefetch_precision"] <= 1
    rc, err = run_cli("--model", str(trained_flash("opt_pre_ln")), "--mode", "flash", "--prefetch", "-m", "2")
    assert rc == 2 and "--lookahead" in err and len(err.splitlines()) == 1
    ahead.flash_reader.close()  # closes the prefetcher's thread first


def test_prefetch_by_default_where_lookahead_predictors_and_the_budget_allow(trained_flash):
    """Default (prefetch=None): on with lookahead predictors; off without them; off (not refused) when
    the budget holds flash but not its prefetch too, where an explicit --prefetch is refused."""
    folder = trained_flash("llama_relu_untied", lookahead=True)
    auto, _ = load(str(folder), mode="flash")
    assert auto.flash_prefetch and auto.flash_plan.staging % 3 == 0
    decode(auto, PROMPT, 4)
    assert auto.flash_stats.prefetched > 0
    auto.flash_reader.close()
    # a fixed prompt chunk: by default a tight budget would take prefetch's room from a shorter chunk
    off, _ = load(str(folder), mode="flash", prefetch=False, prefill_step=128)
    assert not off.flash_prefetch and off.flash_plan.staging * 3 == auto.flash_plan.staging
    tight = off.flash_plan.total  # exactly what flash needs without prefetch
    off.flash_reader.close()
    fallback, _ = load(str(folder), mode="flash", dram_budget=tight, prefill_step=128)
    assert not fallback.flash_prefetch and fallback.flash_plan.total <= tight
    fallback.flash_reader.close()
    with pytest.raises(FlashError):
        load(str(folder), mode="flash", dram_budget=tight, prefetch=True, prefill_step=128)
    plain, _ = load(str(trained_flash("opt_pre_ln")), mode="flash")
    assert not plain.flash_prefetch
    plain.flash_reader.close()
    for flag, shown in (([], True), (["--no-prefetch"], False)):
        rc, err = run_cli("--model", str(folder), "--mode", "flash", *flag, "-m", "12")
        assert rc == 0 and ("prefetch hit rate" in err) == shown, err


def test_no_neuron_predicted_gives_the_ffn_bias_only(trained_flash):
    folder = trained_flash("opt_pre_ln")
    never = [lambda x: mx.full((x.shape[0], 256), -1.0) for _ in range(2)]
    model, _ = load(str(folder), mode="flash", predictor=never)
    _, toks = decode(model, PROMPT, 3)
    assert len(toks) == 3 and model.flash_stats.bundles == 0
