"""The benchmark, the probes and scale mode on tiny settings: structure and invariants, not speed."""

import json
import os
import shutil

import numpy as np
import pytest

from flash_fixtures import direct_root  # noqa: F401  (fixture)
from mlx_flash import bench
from mlx_flash import probe as probe_cli
from mlx_flash.bench import cgroup, probe, rows, scale, windowing
from mlx_flash.flash.bundle_reader import BundleBuffer, BundleReader
from mlx_flash.errors import FlashError
from mlx_flash.format import BUNDLES_FILE, FlashConfig
from mlx_flash.baselines import MappedBundles
from mlx_flash.flash.attach import resident_facts

FLASH = ("predictor", "windowing", "all")


@pytest.fixture(scope="module")
def quick(trained_flash, tmp_path_factory):
    """One --quick run of every row at the smallest budget flash fits (the tiny model's overheads
    are larger than its weights, so 0.5 would hold nothing)."""
    folder = trained_flash("opt_pre_ln")
    out = tmp_path_factory.mktemp("bench")
    res = bench.main(["--model", str(folder), "--quick", "--dram-budget", "min", "--json", str(out / "b.json"),
                      "--plots", str(out / "plots"), "--quiet"])
    return folder, out, res


def test_outputs_written(quick, capsys):
    folder, out, res = quick
    saved = json.loads((out / "b.json").read_text())
    assert set(saved["summary"]) == {bench.key("dense", "-")} | {bench.key(r, "min") for r in bench.ROWS[1:]}
    png = out / "plots" / "latency_breakdown.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["prompt_tokens"] == 8 and saved["gen_tokens"] == 4 and saved["repeats"] == 1


def test_table_printed(trained_flash, tmp_path, capsys):
    bench.main(["--model", str(trained_flash("opt_pre_ln")), "--quick", "--dram-budget", "min", "--rows",
                "dense,windowing", "--no-probe", "--quiet"])
    text = capsys.readouterr().out
    assert "| row | budget MB (what it covers) | resident GB | MB read/token" in text
    assert "(everything) |" in text and "| dense |" in text and "| + windowing |" in text
    assert "DRAM budget min" in text


def test_rows_read_what_they_should(quick):
    folder, _, res = quick
    cfg = FlashConfig.load(folder)
    stride, layer = cfg.layout.stride, cfg.d_ff * cfg.layout.stride
    s = res["summary"]
    dense = s[bench.key("dense", "-")]
    assert dense["fits"] and dense["bytes_read_per_token"] == 0
    for row in ("naive", "hybrid"):  # attention and embeddings are over half of this tiny model
        a = s[bench.key(row, "min")]
        assert not a["fits"] and "--baseline-share" in a["reason"]
    reads = {}
    for row in FLASH:
        a = s[bench.key(row, "min")]
        assert a["fits"], a.get("reason")
        assert a["bytes_read_per_token"] == a["bundles_per_token"] * stride
        # no more than the neurons new to the window, plus the stated overhead (gap fillers)
        assert a["bundles_per_token"] <= a["new_bundles_per_token"] + a["filled_bundles_per_token"] + 1e-9
        if row != "all":
            assert a["filled_bundles_per_token"] == 0
        reads[row] = a["bytes_read_per_token"]
    # without a window every predicted neuron is read every token
    pred = s[bench.key("predictor", "min")]
    assert pred["ffn_share_read"] == pytest.approx(pred["ffn_share_predicted"])
    assert reads["windowing"] <= reads["predictor"]


def test_peak_memory_within_budget_and_quality_present(quick):
    _, _, res = quick
    budget = res["budgets"]["min"]
    for k, a in res["summary"].items():
        if not a["fits"]:
            assert a["reason"]
            continue
        for f in ("agreement", "perplexity", "perplexity_vs_dense", "ms_total", "tokens_per_s", "peak_bytes"):
            assert a[f] is not None, (k, f)
        assert sum(a[f"ms_{p}"] for p in rows.PHASES) == pytest.approx(a["ms_total"], rel=1e-6)
        if a["row"] != "dense":
            assert a["within_budget"] and a["peak_bytes"] <= budget, (k, a["peak_bytes"], budget)
    assert sum(a["fits"] for a in res["summary"].values()) == 4
    assert res["summary"][bench.key("dense", "-")]["agreement"] == 1.0


def run_baselines(folder, tmp_path):
    """naive and hybrid with one FFN layer resident; returns (result, bytes of one layer, layers)."""
    s = bench.load_setup(folder, 8, 4)
    cfg = s.cfg
    layer = cfg.d_ff * cfg.layout.stride
    share = resident_facts(s.model, s.down_bias)[0] + layer + layer // 2  # one FFN layer resident
    del s
    res = bench.main(["--model", str(folder), "--quick", "--rows", "naive,hybrid", "--baseline-share", str(share),
                      "--no-probe", "--quiet", "--json", str(tmp_path / "n.json")])
    for row in ("naive", "hybrid"):
        a = res["summary"][bench.key(row, "0.5")]
        assert a["fits"] and a["plan"]["dense_layers"] == [0] and a["budget"] == share
        assert a["plan"]["weights_in_memory"] <= share
        assert a["bytes_read_per_token"] == (cfg.n_layers - 1) * layer  # exactly the non-resident layers
        assert a["within_budget"] and a["peak_bytes"] <= a["plan"]["total"]
    assert json.loads((tmp_path / "n.json").read_text())["eviction"] == res["eviction"]
    return res, layer, cfg.n_layers


def test_naive_reads_the_non_resident_layers_cold(trained_flash, tmp_path, capsys):
    res, layer, n_layers = run_baselines(trained_flash("opt_pre_ln"), tmp_path)
    for row in ("naive", "hybrid"):
        a = res["summary"][bench.key(row, "0.5")]
        if a["disk_bytes_per_token"] is not None:  # cold pages, direct reads: it came from the disk
            assert a["disk_bytes_per_token"] >= 0.9 * a["bytes_read_per_token"]
    e = res["eviction"]
    assert e["method"].startswith("madvise") and e["verified"] is True and res["direct_reads"] == "O_DIRECT"
    naive = res["summary"][bench.key("naive", "0.5")]
    assert naive["evicted_bytes_per_token"] >= (n_layers - 1) * layer
    assert "verified with mincore after every eviction" in capsys.readouterr().out


@pytest.fixture
def macos_calls(monkeypatch, tmp_path):
    """Linux's own calls taken away, so that system.py takes macOS's paths: no O_DIRECT, no
    posix_fadvise, no /proc or /sys. Linux's fcntl does not know F_NOCACHE: it is recorded and
    accepted (reads then go through the page cache, which is what the eviction check sees)."""
    import fcntl

    from mlx_flash import system

    monkeypatch.delattr(os, "O_DIRECT")
    monkeypatch.delattr(os, "posix_fadvise")
    monkeypatch.setattr(system, "PROC", str(tmp_path / "no-proc"))
    monkeypatch.setattr(system, "SYS", str(tmp_path / "no-sys"))
    nocache, real = [], fcntl.fcntl

    def fake(fd, cmd, arg=0):
        if cmd == system.F_NOCACHE:
            nocache.append(fd)
            return 0
        return real(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", fake)
    return nocache


def test_system_calls_on_macos_paths(macos_calls, tmp_path):
    from mlx_flash import system

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    os.close(system.open_direct(path))
    assert macos_calls and system.direct_read_method() == "F_NOCACHE"
    assert system.eviction_method() == "msync(MS_INVALIDATE) on the mapping"
    m = MappedBundles(path)
    int(m.np[::4096].max())
    m.evict()  # runs msync(MS_INVALIDATE); Linux keeps the clean pages, and mincore says so
    assert m.resident_bytes() == 1 << 20
    m.close()
    system.drop_cache(path)
    assert system.disk_read_bytes() == -1  # no /proc here, no proc_pid_rusage in Linux's libc
    assert system.rss_bytes() > 0 and system.mem_available() > 0 and system.logical_block_size(path) == 512


def test_flash_generation_and_probe_on_macos_paths(trained_flash, macos_calls, tmp_path):
    from mlx_flash.generate import stream
    from mlx_flash.load import load

    model, tokenizer = load(str(trained_flash("opt_pre_ln")), mode="flash")
    steps = list(stream(model, tokenizer, "hello", max_tokens=3))
    assert len(steps) == 3 and macos_calls and model.flash_stats.snapshot()["bytes_read_per_token"] > 0
    model.flash_reader.close()
    path = tmp_path / "probe.bin"
    path.write_bytes(os.urandom(1 << 20))
    r = probe.probe_disk(path, [4096], [2], nbytes=128 << 10)
    assert r["points"][0]["gb_per_s"] > 0


def test_naive_and_hybrid_rows_on_macos_paths(trained_flash, macos_calls, tmp_path, capsys):
    """The benchmark's baselines run on macOS's calls, and the report stays honest: on Linux
    msync(MS_INVALIDATE) leaves the pages cached, so the cold reads are not claimed."""
    res, layer, n_layers = run_baselines(trained_flash("opt_pre_ln"), tmp_path)
    assert macos_calls  # the hybrid row's reader asked for F_NOCACHE
    for row in ("naive", "hybrid"):
        assert res["summary"][bench.key(row, "0.5")]["disk_bytes_per_token"] is None  # unknown without /proc
    e = res["eviction"]
    assert e["method"] == "msync(MS_INVALIDATE) on the mapping" and res["direct_reads"] == "F_NOCACHE"
    assert e["verified"] is False and e["stayed_cached_share"] > 0.5
    out = capsys.readouterr().out
    assert "NOT verified" in out and "stayed warm" in out and "read with F_NOCACHE" in out


def test_mapped_bundles_evict(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    m = MappedBundles(path)
    int(m.np[::4096].max())  # fault everything in
    assert m.resident_bytes() == 1 << 20
    m.evict()
    assert m.resident_bytes() == 0
    m.close()


def test_no_reuse_cache():
    c = rows.NoReuseCache(20, 10, 1)
    for _ in range(2):
        ids, where = c.step(np.array([2, 5, 7]))
        c.commit()
        assert ids.tolist() == [2, 5, 7] and where.tolist() == [0, 1, 2]


def test_cgroup_failure_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(cgroup, "cgroup_root", lambda: tmp_path / "missing" / "deeper")
    with pytest.raises(FlashError, match="cannot create the memory cgroup"):
        cgroup.make_cgroup()


def cgroup_usable() -> bool:
    try:
        cg = cgroup.make_cgroup()
    except FlashError:
        return False
    cg.rmdir()
    return True


def test_cgroup_child_runs_rows(trained_flash, tmp_path):
    if not cgroup_usable():
        pytest.skip("no writable cgroup v1 memory controller here")
    res = bench.main(["--model", str(trained_flash("opt_pre_ln")), "--quick", "--cgroup", "--rows",
                      "hybrid,windowing", "--baseline-share", "0.8", "--dram-budget", "min", "--no-probe", "--quiet",
                      "--json", str(tmp_path / "c.json")])
    c = res["cgroup"]
    assert c["baseline_bytes"] > 0 and c["baseline_rss_bytes"] > 0
    for row in ("hybrid", "windowing"):
        a = res["summary"][bench.key(row, "min")]
        assert a["fits"] and a["bytes_read_per_token"] > 0 and "peak_cgroup_bytes" in a


def test_probe_disk_small(direct_root):  # noqa: F811
    path = direct_root / "probe.bin"
    path.write_bytes(os.urandom(2 << 20))
    r = probe.probe_disk(path, [4096, 65536], [1, 4], nbytes=256 << 10)
    assert len(r["points"]) == 4 and all(p["gb_per_s"] > 0 and p["bytes"] >= 256 << 10 for p in r["points"])
    assert probe.probe_at(r, 16384, 4) is not None and probe.probe_at(r, 4096, 2) is None
    probe.plot_disk(r, direct_root / "d.png")
    assert (direct_root / "d.png").stat().st_size > 0
    with pytest.raises(FlashError, match="multiple of the disk"):
        probe.probe_disk(path, [1000], [1])
    assert probe.parse_range("4K:16K", size=True) == [4096, 8192, 16384]
    assert probe.parse_range("1,2,8") == [1, 2, 8] and probe.parse_size("1.5M") == 3 << 19


def test_probe_cli_and_windowing_curve(trained_flash, tmp_path, capsys):
    folder = trained_flash("opt_pre_ln")
    probe_cli.main(["disk", "--model", str(folder), "--chunks", "4K,16K", "--threads", "1,2", "--bytes", "128K",
                "--scratch", str(tmp_path / "scratch"), "--scratch-size", "1M", "--json", str(tmp_path / "d.json"),
                "--quiet"])
    assert len(json.loads((tmp_path / "d.json").read_text())["points"]) == 4
    probe_cli.main(["window", "--model", str(folder), "--windows", "1:4", "--tokens", "256", "--seq-len", "64",
                "--json", str(tmp_path / "w.json"), "--plots", str(tmp_path), "--quiet"])
    w = json.loads((tmp_path / "w.json").read_text())
    new = [p["new_share"] for p in w["points"]]
    held = [p["held_share"] for p in w["points"]]
    assert [p["window"] for p in w["points"]] == [1, 2, 3, 4]
    assert all(a >= b - 1e-12 for a, b in zip(new, new[1:])) and all(a <= b + 1e-12 for a, b in zip(held, held[1:]))
    # a window of 1 holds one token's predicted set: the share calibration measured, on other text
    assert new[0] <= held[0] and abs(held[0] - w["predicted_share"]) < 0.05
    assert (tmp_path / "windowing.png").is_file()
    assert "| window | new per token | held |" in capsys.readouterr().out


def test_window_curve_simple_sets():
    same = [np.tile(np.arange(16) < 4, (20, 1))]  # the same 4 of 16 neurons every token
    c = windowing.window_curve(same, 10, [1, 3])
    assert all(p["new_share"] == 0 and p["held_share"] == 0.25 for p in c["points"])


def test_activation_process_hits_its_targets():
    proc = scale.ActivationProcess(4096, 4, seed=0)
    e = proc.expected
    assert e["new_share"] == pytest.approx(0.024, rel=1e-3) and 0 < e["rho"] < 1
    m = scale.measure_process(proc, tokens=150, warmup=10)
    assert m["predicted_share"] == pytest.approx(0.10, abs=0.01)
    assert m["new_share"] == pytest.approx(0.024, abs=0.004)
    assert m["held_share"] == pytest.approx(e["held_share"], abs=0.02)
    with pytest.raises(FlashError):
        scale.ActivationProcess(64, 1, predicted_share=0.1, new_share=0.2)


def test_synthetic_file_written_once_and_readable(direct_root, monkeypatch):  # noqa: F811
    g = scale.GEOMETRIES["tiny"]
    folder = direct_root / "syn"
    cfg = scale.write_synthetic(folder, g, 2, progress=False)
    assert cfg.source["synthetic"] == "tiny" and (folder / BUNDLES_FILE).stat().st_size == cfg.file_size
    assert cfg.layout.stride == g.layout.stride
    buf = BundleBuffer(cfg.d_ff, cfg.layout)
    with BundleReader(folder, cfg, threads=2, verify=True) as r:  # every CRC checks out
        r.read_layer_all(1, buf)
    assert np.isfinite(np.array(buf.field("up"), dtype=np.float32)).all()
    mtime = (folder / BUNDLES_FILE).stat().st_mtime_ns
    scale.write_synthetic(folder, g, 1, progress=False)  # reused
    assert (folder / BUNDLES_FILE).stat().st_mtime_ns == mtime
    usage = shutil.disk_usage(direct_root)
    monkeypatch.setattr(scale.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(FlashError, match="free"):
        scale.write_synthetic(direct_root / "syn2", scale.GEOMETRIES["opt-6.7b"], 32, progress=False)
    assert scale.hybrid_layers(scale.GEOMETRIES["opt-6.7b"]) == 25


def test_scale_quick_command(direct_root, capsys):  # noqa: F811
    res = bench.main(["--scale", "tiny", "--scale-dir", str(direct_root / "syn-cli"), "--quick", "--quiet",
                      "--json", str(direct_root / "s.json"), "--plots", str(direct_root / "splots")])
    assert res["synthetic"] and set(res["rows"]) == set(scale.SYNTHETIC_ROWS)
    for r in res["rows"].values():
        assert r["bytes_read_per_token"] > 0 and r["ms_io"] > 0
    assert res["rows"]["windowing"]["bytes_read_per_token"] < res["rows"]["predictor"]["bytes_read_per_token"]
    assert (direct_root / "splots" / "scale_breakdown.png").is_file()
    assert "SYNTHETIC" in capsys.readouterr().out


def test_sweep_over_budgets(trained_flash, tmp_path):
    res = bench.main(["--model", str(trained_flash("opt_pre_ln")), "--quick", "--sweep", "0.8:1.0:0.2", "--rows",
                      "hybrid,windowing", "--baseline-share", "0.9", "--no-probe", "--quiet", "--plots", str(tmp_path)])
    assert list(res["budgets"]) == ["0.80", "1.00"]
    for label in res["budgets"]:
        assert res["summary"][bench.key("hybrid", label)]["fits"]
        w = res["summary"][bench.key("windowing", label)]  # the tiny model's overheads exceed its weights
        assert not w["fits"] and "cannot hold this model" in w["reason"]
    assert (tmp_path / "latency_vs_budget.png").is_file() and (tmp_path / "latency_breakdown_1.png").is_file()


def test_calibration_command_times_each_rank(tmp_path, capsys):
    """--calibration writes, converts and calibrates one layer at the geometry, once per rank default_ranks
    gives, and projects the whole model from those layers; its files go unless --keep."""
    res = bench.main(["--calibration", "tiny", "--tokens", "128", "--dir", str(tmp_path / "cal"), "--quiet",
                      "--json", str(tmp_path / "cal.json")])
    assert res["d_ff"] == 256 and res["tokens"] == 128 and 0.02 < res["true_share"] < 0.3  # the biases' ~10%
    runs = res["by_rank"]
    assert sum(r["layers"] for r in runs.values()) == scale.GEOMETRIES["tiny"].n_layers
    for r in runs.values():
        assert r["per_layer_s"] == pytest.approx(sum(r["by_phase_s"].values())) and r["per_layer_s"] > 0
    assert res["projected_model_s"] == pytest.approx(
        res["setup_s"] + sum(r["per_layer_s"] * r["layers"] for r in runs.values()))
    assert json.loads((tmp_path / "cal.json").read_text())["geometry"] == "tiny"
    assert not (tmp_path / "cal").exists()
    assert "projected for all 2 layers" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--calibration", "opt-7b", "--dir", str(tmp_path / "x")])
    assert "unknown geometry" in capsys.readouterr().err


def test_probe_matmul_small(tmp_path, capsys):
    """`probe matmul`: every engine at every token count, rates from the timed ms, and one line for bad input."""
    probe_cli.main(["matmul", "--shape", "128x256", "--tokens", "1,4", "--bits", "8", "--repeats", "1",
                    "--json", str(tmp_path / "m.json")])
    r = json.loads((tmp_path / "m.json").read_text())
    assert {(p["tokens"], p["engine"]) for p in r["points"]} == {
        (n, e) for n in (1, 4) for e in ("mlx float32", "mlx 8-bit", "numpy float32")}
    for p in r["points"]:
        assert p["ms"] > 0 and p["gflop_per_s"] == pytest.approx(2 * p["tokens"] * 128 * 256 / p["ms"] / 1e6)
    assert r["dequantize_ms"]["mlx"] > 0 and r["dequantize_ms"]["numpy"] > 0
    assert "| 4 | numpy float32 |" in capsys.readouterr().out
    for bad in (["--shape", "100x256"], ["--shape", "wide"], ["--tokens", "0"], ["--tokens", "a"]):
        with pytest.raises(SystemExit) as e:
            probe_cli.main(["matmul", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --") and "\n" not in err
