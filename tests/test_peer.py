"""Peer mode (bench.peer) without llama.cpp built: parsing recorded llama-bench output, the memory limit's
arithmetic, the synthetic GGUF both runtimes read, the report, and "peer not built" when the binary is absent.

tests/golden/llama-bench-smollm2-135m.json is llama-bench's `-o json` as recorded on the development machine
(2026-12-03, `make peer`'s build): `llama-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -p 32 -n 16 -r 1 -t 2 -lm mmap
-o json`.
"""

import json
from pathlib import Path

import pytest

from mlx_flash.bench import peer, peer_model
from mlx_flash.errors import FlashError
from mlx_flash.gguf import load_gguf

RECORDED = Path(__file__).parent / "golden" / "llama-bench-smollm2-135m.json"


def test_parse_recorded_llama_bench():
    r = peer.parse_llama_bench(RECORDED.read_text())
    assert r["prompt_tok_s"] == pytest.approx(80.444143) and r["prompt_tokens"] == 32
    assert r["decode_tok_s"] == pytest.approx(9.496279) and r["decode_tokens"] == 16
    assert r["decode_samples_tok_s"] == [pytest.approx(9.49628)]
    assert r["threads"] == 2 and r["build"] == "34f1145 (133)" and r["model_size"] == 96576768


def test_parse_refuses_what_is_not_llama_bench_json():
    with pytest.raises(FlashError, match="not JSON"):
        peer.parse_llama_bench("| model | size |\n| --- | --- |")  # its markdown, not -o json
    with pytest.raises(FlashError, match="list of tests"):
        peer.parse_llama_bench('{"avg_ts": 1}')


def test_bench_command_maps_the_weights():
    cmd = peer.bench_command(Path("/x/llama-bench"), Path("m.gguf"), 32, 16, 2, 2)
    assert cmd[cmd.index("-lm") + 1] == "mmap" and cmd[cmd.index("-o") + 1] == "json"
    assert [cmd[cmd.index(f) + 1] for f in ("-p", "-n", "-r", "-t")] == ["32", "16", "2", "2"]


def test_limits_and_the_budget_they_leave():
    size = 100_000_000
    limits = peer.parse_limits("2, 0.5,150M,1", size)
    assert list(limits) == ["0.5x", "1x", "150M", "2x"]  # ascending
    assert limits["0.5x"] == 50_000_000 and limits["150M"] == 150 << 20
    # the child's limit is budget + baseline + slack (bench.cgroup), so the budget is what the limit leaves
    limit, baseline, slack = limits["2x"], 102_500_000, 8 << 20
    budget = peer.budget_for(limit, baseline, slack)
    assert budget + baseline + slack == limit and budget == 200_000_000 - 102_500_000 - 8_388_608
    assert peer.budget_for(limits["0.5x"], baseline, slack) <= 0  # the interpreter alone is over the limit
    # a row's smallest limit (--limits min) leaves at least its plan's budget, with the margin, in whole MiB
    low = peer.limit_for(138_600_000, baseline, slack)
    assert low % (1 << 20) == 0 and peer.budget_for(low, baseline, slack) - peer.MIN_MARGIN >= 138_600_000
    assert peer.budget_for(low - (1 << 20), baseline, slack) - peer.MIN_MARGIN < 138_600_000
    for bad in ("0", "-1", "lots", ""):
        with pytest.raises(FlashError, match="--limits"):
            peer.parse_limits(bad, size)


def test_rows_say_peer_not_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLX_FLASH_PEER", str(tmp_path / "peer"))
    row = peer.peer_row(tmp_path / "m.gguf", 100 << 20, 8, 4, 1, 1)
    assert row == {"row": "llama.cpp", "fits": False, "reason": peer.NOT_BUILT}
    assert row["reason"].startswith("peer not built")
    from mlx_flash.bench import main

    with pytest.raises(SystemExit) as e:
        main(["--peer", "--quick"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: peer not built: run `make peer`")


def test_synthetic_gguf_is_a_llama_our_reader_takes(tmp_path):
    path = peer_model.write_synthetic_gguf(tmp_path / "tiny.gguf", "tiny")
    config, weights, tok = load_gguf(path)
    g = peer_model.GEOMETRIES["tiny"]
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == g["layers"]
    assert (config["hidden_size"], config["intermediate_size"]) == (g["d_model"], g["d_ff"])
    assert config["num_key_value_heads"] == g["kv_heads"] and config["vocab_size"] == 49152
    assert "model.layers.1.mlp.down_proj.weight" in weights and tok["model"] == "gpt2" and tok["eos"] == 2
    assert peer_model.write_synthetic_gguf(path, "tiny") == path  # written once


def test_report_and_smallest_limit(tmp_path, capsys):
    """From rows as run() collects them: the table, and the smallest limit each ran at with its tokens/s."""
    ok = lambda tok_s, peak, disk: {"fits": True, "decode_tok_s": tok_s, "prompt_tok_s": 10 * tok_s,
                                    "peak_cgroup_bytes": peak, "disk_bytes_per_token": disk}
    no = {"fits": False, "reason": "the interpreter's baseline alone exceeds the limit"}
    limits = {"0.5x": 50_000_000, "1x": 100_000_000, "2x": 200_000_000}
    rows = {"llama.cpp@-": ok(60.0, 126e6, 0.0), "dense@-": ok(9.0, 230e6, 0.0),
            "llama.cpp@0.5x": ok(0.4, 50e6, 700e6), "naive@0.5x": no, "windowing@0.5x": no,
            "llama.cpp@1x": ok(5.0, 100e6, 90e6), "naive@1x": no, "windowing@1x": no,
            "llama.cpp@2x": ok(59.0, 126e6, 0.0), "naive@2x": ok(8.7, 190e6, 0.0), "windowing@2x": ok(8.5, 199e6, 0.0)}
    small = peer.smallest(rows, limits)
    assert small["llama.cpp"]["limit_label"] == "0.5x" and small["llama.cpp"]["decode_tok_s"] == 0.4
    assert small["windowing"]["limit_label"] == "2x" and small["naive"]["limit"] == 200_000_000
    result = {"date": "2026-12-03 16:00 UTC", "threads": 2, "prompt_tokens": 8, "gen_tokens": 4, "repeats": 1,
              "load_average": [2.0, 2.5], "peer_build": None,
              "models": [{"name": "m", "synthetic": False, "geometry": "2 layers", "gguf_bytes": 100_000_000,
                          "flash_model_bytes": 110_000_000, "limits": limits, "baseline_bytes": 102_500_000,
                          "slack_bytes": 8 << 20, "rows": rows, "smallest": small}]}
    peer.print_report(result)
    out = capsys.readouterr().out
    assert "| 50.0 (0.50x) | llama.cpp (mmap) | 0.40 | 4.00 | 50.0 | 700.0 |" in out
    assert "does not run: the interpreter's baseline alone exceeds the limit" in out
    assert "smallest limit flash (MLX) ran at: 200.0 MB (2x), 8.50 decode tok/s" in out
    assert "| none | 60.00 | - | dense: 9.00 | 0.0 | - | - |" in out  # side by side, one line per limit
    assert "| 50.0 (0.50x) | 0.40 | - | - | 700.0 | - | - |" in out
    saved = tmp_path / "peer.json"
    saved.write_text(json.dumps(result))  # as --json writes it; --report prints it again, no peer needed
    from mlx_flash.bench import main

    main(["--peer", "--report", str(saved)])
    assert capsys.readouterr().out == out
    saved.write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["--peer", "--report", str(saved)])
    assert e.value.code == 2 and "not a --json file written by --peer" in capsys.readouterr().err


def test_make_peer_names_a_missing_compiler(tmp_path, monkeypatch, capsys):
    """`make peer` without a C++ compiler: one line naming it, nothing downloaded or built."""
    from mlx_flash.bench import peer_build

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(SystemExit) as e:
        peer_build.main(["--dir", str(tmp_path / "peer")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "needs a C++ compiler" in err[0]
    assert not (tmp_path / "peer").exists()
