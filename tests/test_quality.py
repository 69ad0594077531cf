"""Flash mode answers like dense: outlier neurons pinned, sequence starts calibrated, quality measured."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.evaluate import evaluate, greedy, greedy_match
from mlx_flash.flash.bundle_reader import BUFFER_ALIGN
from mlx_flash.flash.outliers import pinned_neurons
from mlx_flash.flash.predictor import report
from mlx_flash.flash.sparsity import paragraph_offsets, read_texts, start_sequences
from mlx_flash.format import FlashConfig
from mlx_flash.load import load, load_flash
from mlx_flash.sources import load_tokenizer
from test_flash import PROMPT, decode


def test_outlier_rule_pins_only_the_neurons_far_above_their_layer():
    rng = np.random.default_rng(0)
    c = rng.uniform(1, 10, 1536).astype(np.float32)  # a layer's largest contributions, all ordinary
    assert pinned_neurons(c) == []
    c[[1229, 7]] = [25000, 400]  # a massive activation, and one at ~73x the median (5.5): kept out
    assert pinned_neurons(c, ratio=100) == [1229]
    assert pinned_neurons(c, ratio=50) == [1229, 7]  # largest first
    assert pinned_neurons(c, ratio=50, max_per_layer=1) == [1229]
    relu = np.zeros(256, dtype=np.float32)  # most neurons of a ReLU layer never fire: they are left out
    relu[:10], relu[3] = 1.0, 500.0
    assert pinned_neurons(relu) == [3]
    assert pinned_neurons(np.zeros(8, dtype=np.float32)) == []


def test_contribution_recall_weighs_neurons_by_what_they_carry():
    y = np.array([[True, True, True, False]])
    z = np.array([[1.0, 1.0, -1.0, 1.0]])  # predicts neurons 0, 1 (and 3, inactive): misses 2
    c = np.array([[1.0, 1.0, 10.0, 0.0]])
    r = report(z, y, 0.0, c)
    assert r.recall == pytest.approx(2 / 3) and r.contribution_recall == pytest.approx(2 / 102)
    r = report(z, y, 0.0, c, covered=np.array([100.0]))  # a pinned neuron carried 100 of the energy
    assert r.contribution_recall == pytest.approx(102 / 202)


def test_calibration_sequences_start_like_prompts(trained_flash):
    folder = trained_flash("llama_silu_tied")
    tok = load_tokenizer(folder)
    text = read_texts(None)
    seqs = start_sequences(tok, text, 6, 32)
    assert seqs.shape == (6, 32)
    plain = [tok.encode(text[o : o + 400])[:32] for o in paragraph_offsets(text)]
    chat = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    head = tok.encode(chat, add_special_tokens=False)[:3]
    assert list(seqs[0]) in plain  # a paragraph's start, encoded as a prompt is
    assert list(seqs[1][:3]) == head  # a chat's start
    cfg = FlashConfig.load(folder).predictors["calibration"]
    assert cfg["seq_len"] == 128 and cfg["sequences"] == cfg["tokens"] // 128 and "chat" in cfg["starts"]


def with_pinned(folder, tmp_path, pinned):
    out = tmp_path / "m"
    shutil.copytree(folder, out)
    cfg = json.loads((out / "flash.json").read_text())
    cfg["predictors"]["pinned"] = pinned
    (out / "flash.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("name", ["llama_silu_tied", "opt_pre_ln"])
def test_pinned_neurons_are_computed_whatever_the_predictor_says(trained_flash, tmp_path, name):
    folder = trained_flash(name)
    cfg = FlashConfig.load(folder)
    half = [list(range(0, cfg.d_ff, 2))] * cfg.n_layers  # pinned: the even neurons
    out = with_pinned(folder, tmp_path, half)
    dense, _ = load(str(out), mode="dense")
    every = [lambda x: mx.ones((*x.shape[:-1], cfg.d_ff))] * cfg.n_layers  # predicts every neuron
    flash, _ = load(str(out), mode="flash", predictor=every, slots=cfg.d_ff // 2 + 1)
    want, want_toks = decode(dense, PROMPT, 6)
    got, got_toks = decode(flash, PROMPT, 6)
    assert got_toks == want_toks
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    layer = flash.layers[0].mlp
    assert set(layer.cache.resident.tolist()) == set(range(1, cfg.d_ff, 2))  # the window holds the others
    align = len(cfg.layout.fields) * BUFFER_ALIGN  # each buffer's field arrays start on a page
    assert flash.flash_plan.pinned_bytes == cfg.n_layers * (cfg.d_ff // 2 * cfg.layout.field_bytes + align)
    assert flash.flash_stats.snapshot()["ffn_share_predicted"] == pytest.approx(0.5)  # pinned: not predicted


def test_plan_counts_the_pinned_neurons(trained_flash, tmp_path):
    folder = trained_flash("llama_silu_tied")
    cfg = FlashConfig.load(folder)
    out = with_pinned(folder, tmp_path, [[1, 2, 3]] + [[]] * (cfg.n_layers - 1))
    a, _ = load_flash(folder, "flash")
    b, _ = load_flash(out, "flash")
    assert b.flash_plan.pinned == [[1, 2, 3]] + [[]] * (cfg.n_layers - 1)
    assert b.flash_plan.total - a.flash_plan.total == 3 * cfg.layout.field_bytes + len(cfg.layout.fields) * BUFFER_ALIGN


def test_trained_predictors_store_both_recalls_and_the_pins(trained_flash):
    p = FlashConfig.load(trained_flash("llama_silu_tied")).predictors
    assert p["weight"] == "contribution" and len(p["pinned"]) == len(p["rank"])
    assert all(0 < r <= 1 for r in p["contribution_recall"])
    for level in p["recall_levels"].values():
        assert len(level["contribution_recall"]) == len(p["rank"])
    assert len(p["pin_rule"]["largest_ratios"]) == len(p["rank"])


def test_evaluate_reports_kl_worst_layer_and_greedy(trained_flash):
    folder = trained_flash("llama_silu_tied")
    r = evaluate(folder, tokens=24, starts=2, greedy_tokens=4, progress=False)
    f = r["flash"][0]
    assert set(f["sets"]) == {"long", "starts"} and f["sets"]["starts"]["positions"] == 2 * 32
    assert f["kl_mean"] >= 0 and 0 <= f["agreement"] <= 1
    assert len(f["layer_rel_err"]) == FlashConfig.load(folder).n_layers
    assert f["worst_layer"]["rel_err_mean"] == max(f["layer_rel_err"])
    assert f["greedy"]["prompts"] == 6 and 0 <= f["greedy"]["identical"] <= 6


def test_greedy_match_finds_where_decoding_parts():
    d = [{"prompt": "a", "tokens": [1, 2, 3], "margins": [5.0, 0.1, 2.0]}] * 2
    f = [{"prompt": "a", "tokens": [1, 2, 3]}, {"prompt": "a", "tokens": [1, 4, 3]}]
    m = greedy_match(d, f)
    assert m["identical"] == 1 and m["per_prompt"][1]["first_difference"] == 1
    assert m["per_prompt"][1]["dense_margin_there"] == 0.1


def test_builtin_pins_the_massive_activations(smol_calibrated):
    """Layer 11 neuron 1229 fires at |h| ~ 2,500 on every sequence's first token (README, "Quality")."""
    p = FlashConfig.load(smol_calibrated).predictors
    assert 1229 in p["pinned"][11]
    assert sum(map(len, p["pinned"])) <= 8  # a handful, not a hot set


def test_builtin_flash_reproduces_dense_greedy_from_the_prompt_start(smol_calibrated):
    dense, tok = load(str(smol_calibrated), mode="dense")
    flash, _ = load(str(smol_calibrated), mode="flash")
    m = greedy_match(greedy(dense, tok, 24), greedy(flash, tok, 24))
    # measured at the defaults (README, "Quality"): all six prompts identical for 32 tokens; before the
    # outliers were pinned, "In 1905, Albert Einstein published" parted at the first token
    assert m["identical"] == len(m["per_prompt"]), m["per_prompt"]


def test_oracle_predictor_evaluates_what_sparsity_alone_costs(trained_flash):
    folder = trained_flash("llama_silu_tied")
    r = evaluate(folder, tokens=16, starts=0, greedy_tokens=0, progress=False, configs=[{"oracle": True}])
    f = r["flash"][0]
    p = FlashConfig.load(folder).predictors
    assert f["recall"] == "oracle"
    # exactly the truly active neurons are predicted: the calibrated sparsity, up to the text
    assert abs(f["stats"]["ffn_share_predicted"] - (1 - p["sparsity_target"])) < 0.15
