"""bench --same-budget on a tiny synthetic geometry: every row, its fields and its invariants, not speed."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from flash_fixtures import direct_root  # noqa: F401  (fixture)
from mlx_flash import bench
from mlx_flash.bench import same_budget, synthetic
from mlx_flash.errors import FlashError
from mlx_flash.format import FlashConfig

FIELDS = ("ms_total", "ms_io", "ms_io_exposed", "ms_mem", "ms_compute", "peak_bytes", "fits", "bytes_read_per_token",
          "planned_bytes", "budget")


@pytest.fixture(scope="module")
def run(direct_root, tmp_path_factory):  # noqa: F811
    # 210%: the tiny model's fixed costs (staging, the naive row's readahead) are larger than its weights
    out = tmp_path_factory.mktemp("same") / "s.json"
    res = bench.main(["--same-budget", "tiny-ffn", "--dir", str(direct_root / "e2e"), "--share", "210%", "--quick",
                      "--quiet", "--json", str(out)])
    return res, json.loads(out.read_text()), FlashConfig.load(direct_root / "e2e")


def test_every_row_with_its_fields(run):
    _, saved, cfg = run
    assert saved["synthetic"] and cfg.source["synthetic"] == "tiny-ffn" and cfg.quantization["bits"] == 4
    assert set(saved["summary"]) == {f"{r}@210%" for r in same_budget.ROWS}
    for k, a in saved["summary"].items():
        assert a["fits"], (k, a.get("reason"))
        assert all(f in a for f in FIELDS), k
        assert a["ms_total"] > 0 and a["ms_compute"] > 0


def test_resident_matrices_in_the_layout_convert_chooses_here(run, direct_root):  # noqa: F811
    """The synthetic folder stores attention and the tied LM head as `convert --quantize` would on this
    machine's default device (the CPU in tests: in-out), and the rows computed with those modules."""
    from mlx_flash.load import load_resident
    from mlx_flash.models.in_out import InOutEmbedding, InOutLinear, default_layout

    _, saved, cfg = run
    assert saved["resident_layout"] == default_layout() == cfg.source["resident_layout"] == "in-out"
    model, _ = load_resident(direct_root / "e2e", cfg)
    named = cfg.model_config["quantization"]["in_out"]
    assert len(named) == 4 * cfg.n_layers + 1
    mods = dict(model.named_modules())
    assert all(isinstance(mods[p], InOutEmbedding if p.endswith("embed_tokens") else InOutLinear) for p in named)


def test_same_budget_for_everyone_and_plans_within_it(run):
    res, _, _ = run
    budget = res["budget"]
    assert budget == int(2.1 * res["model_bytes"])
    for a in res["summary"].values():
        assert a["budget"] == budget and a["planned_bytes"] <= budget
        assert a["peak_bytes"] <= budget
    # the baselines hold whole layers only while everything they plan fits; here none does
    naive = res["summary"]["naive@210%"]
    assert naive["plan"]["dense_layers"] == [] and naive["plan"]["total"] <= budget


def test_reads(run):
    res, _, cfg = run
    s = {a["row"]: a for a in res["summary"].values()}
    layer = cfg.d_ff * cfg.layout.stride
    for row in ("naive", "hybrid"):  # every streamed layer whole, every token
        assert s[row]["bytes_read_per_token"] == cfg.n_layers * layer
        assert s[row]["ms_io_exposed"] == s[row]["ms_io"]
    for row in ("all", "all+prefetch"):
        a = s[row]
        assert a["bytes_read_per_token"] == a["bundles_per_token"] * cfg.layout.stride
        assert a["bytes_read_per_token"] * 10 < s["naive"]["bytes_read_per_token"]
    # without prefetch exactly the neurons new to the windows are read
    assert s["all"]["bundles_per_token"] == s["all"]["needed_per_token"]
    assert s["all"]["prefetch_hit_rate"] is None and s["all"]["ms_io_exposed"] == pytest.approx(s["all"]["ms_io"])


def test_prefetch_accounts_for_the_needed_bundles(run):
    res, _, _ = run
    a = res["summary"]["all+prefetch@210%"]
    assert a["prefetched_per_token"] > 0 and 0 < a["prefetch_hit_rate"] <= 1
    hits = a["prefetch_hit_rate"] * a["needed_per_token"]
    misses = a["bundles_per_token"] - a["prefetched_per_token"]  # read after the layer's own prediction
    assert hits + misses == pytest.approx(a["needed_per_token"])
    assert hits + a["prefetch_wasted_per_token"] == pytest.approx(a["prefetched_per_token"])
    assert a["ms_io_exposed"] <= a["ms_io"] + 1e-9


def test_synthetic_predictor_names_the_process_set_at_a_real_cost():
    g = synthetic.GEOMETRIES["tiny-ffn"]
    sets = synthetic.ActiveSets(g.d_ff, 2, seed=0)
    p = synthetic.SyntheticPredictor(0, sets, g.d_model, 16)
    scores = np.array(p(mx.zeros((1, g.d_model))))
    assert scores.shape == (1, g.d_ff)
    assert np.array_equal(np.flatnonzero(scores[0] > 0), sets.sets[0]) and len(sets.sets) == 2
    # its low-rank weights are what flash.budget.plan counts as predictor bytes
    assert sum(v.nbytes for _, v in tree_flatten(p.parameters())) >= g.d_model * 16 // 4


def test_bad_input_is_one_line(direct_root, capsys):  # noqa: F811
    for argv, msg in ((["--same-budget", "opt-99b"], "unknown geometry"),
                      (["--same-budget", "tiny-ffn", "--rows", "naive,bogus"], "unknown row bogus"),
                      (["--same-budget", "tiny-ffn", "--hit", "2"], "--hit"),
                      (["--same-budget", "tiny-ffn", "--layers", "9"], "--layers"),
                      (["--same-budget", "tiny-ffn", "--share", "half"], "--share 'half'")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv + ["--dir", str(direct_root / "bad"), "--quiet"])
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1
    with pytest.raises(FlashError):
        same_budget.check_args(same_budget.setup_arg_parser().parse_args(["--same-budget", "tiny", "--tokens", "1"]))


def test_demo_prints_flash_against_naive_at_one_budget(direct_root, capsys):  # noqa: F811
    """make demo's last act, on the tiny geometry: two rows at one budget, labelled synthetic."""
    from mlx_flash import demo

    demo.synthetic_comparison(["--same-budget", "tiny-ffn", "--dir", str(direct_root / "e2e-demo"), "--share",
                               "210%", "--rows", "naive,all", "--quick", "--quiet"])
    err = capsys.readouterr().err
    assert "SYNTHETIC" in err and "budget" in err
    naive = next(l for l in err.splitlines() if l.strip().startswith("naive mmap:"))
    flash = next(l for l in err.splitlines() if l.strip().startswith("flash:") and "read/token" in l)
    assert "MB read/token" in naive and "ms/token" in naive and "ms/token" in flash
    assert "fewer bytes read per token" in err and "python -m mlx_flash.bench --same-budget tiny-ffn" in err


def test_prompts_mode_times_the_first_token_of_each_row(direct_root, capsys):  # noqa: F811
    """--prompts: every row at one budget and chunk; the pass reads the whole FFN once per chunk and fewer
    bytes than window steps on a long prompt, with the synthetic predictors naming each token's own set."""
    from mlx_flash.bench import prompts

    res = bench.main(["--prompts", "tiny-ffn", "--lengths", "8,64", "--share", "8M", "--quick", "--quiet",
                      "--dir", str(direct_root / "syn-prompts"), "--json", str(direct_root / "p.json")])
    s, ffn = res["summary"], res["ffn_bytes"]
    for n in (8, 64):
        assert s[f"pass@{n}"]["bytes_read"] == ffn * -(-n // res["chunks"][n])
        assert s[f"pass@{n}"]["mode"] == "pass" and s[f"window@{n}"]["mode"] == "window steps"
        assert all(s[f"{r}@{n}"]["ttft_s"] > 0 for r in prompts.ROWS)
        floor = s[f"floor@{n}"]
        assert floor["compute_s"] == s[f"pass@{n}"]["compute_s"] and floor["ttft_s"] > floor["compute_s"]
    assert s["window@64"]["bytes_read"] > s["window@8"]["bytes_read"]  # more tokens, more distinct neurons
    assert s["window@64"]["steps"] > 4  # groups: the tokens' sets do not all fit one window
    out = capsys.readouterr().out
    assert "time to first token" in out and "SYNTHETIC" in out
    with pytest.raises(SystemExit):
        bench.main(["--prompts", "tiny-ffn", "--rows", "all"])
