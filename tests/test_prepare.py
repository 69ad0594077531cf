"""Built-in names in flash mode: every command uses the converted, calibrated copy, prepared once.

A tiny random Llama stands in for the built-in model (registered by monkeypatching), and the
copies go to a temporary MLX_FLASH_MODELS: the real calibration takes minutes.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mlx_flash import bench, evaluate, generate, prepare, probe, server, sources
from mlx_flash.errors import FlashError
from mlx_flash.format import FlashConfig
from mlx_flash.load import load

NAME = "tiny-builtin"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def builtin(tiny_model, tmp_path_factory):
    """NAME is a built-in model here (its source: a tiny random Llama); returns where its copy goes."""
    src = tiny_model("llama_silu_tied")
    models = tmp_path_factory.mktemp("models")
    real = sources.builtin_path
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sources.BUILTIN_MODELS, NAME, ("unused", "unused"))
        mp.setattr(sources, "builtin_path", lambda name: src if name == NAME else real(name))
        mp.setenv("MLX_FLASH_MODELS", str(models))
        mp.setattr(prepare, "CALIBRATION_TOKENS", 512)
        yield models / NAME


def test_load_asks_for_preparation_first(builtin, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_MODELS", str(tmp_path))  # nothing prepared there
    with pytest.raises(FlashError, match=r"mlx_flash.prepare.prepare\('tiny-builtin'\)"):
        load(NAME, mode="flash")


def test_generate_prepares_once_with_progress_on_stderr(builtin, capsys, monkeypatch):
    generate.main(["--model", NAME, "--mode", "flash", "-m", "3", "-p", "hello"])
    out, err = capsys.readouterr()
    assert "converting tiny-builtin" in err and "training the activation predictors" in err
    assert "bundling FFN layers" in err and "training predictors" in err  # the progress bars
    assert "wrote" in err and "wrote" not in out and "prompt:" in err  # stdout is the generated text only
    assert FlashConfig.load(builtin).predictors is not None

    def again(*a, **k):
        raise AssertionError("prepared twice")

    monkeypatch.setattr(prepare, "convert", again)
    monkeypatch.setattr(prepare, "train", again)
    generate.main(["--model", NAME, "--mode", "flash", "-m", "3", "-p", "hello"])
    out, err = capsys.readouterr()
    assert "converting" not in err and "read/token" in err
    model, _ = load(NAME, mode="flash")  # the Python API finds the copy too
    assert model.flash_plan.model > 0 and str(model.flash_reader.path).startswith(str(builtin))
    model.flash_reader.close()


def test_dense_mode_reads_the_source(builtin, monkeypatch):
    monkeypatch.setattr(prepare, "prepare", lambda *a, **k: pytest.fail("dense mode needs no preparation"))
    assert prepare.model_for(NAME, "dense") == NAME
    assert prepare.model_for("models/x", "flash") == "models/x"  # only built-in names are prepared


def test_evaluate_bench_and_probe_take_the_name(builtin, tmp_path, capsys):
    r = evaluate.evaluate(NAME, tokens=8, mode="flash", progress=False)
    assert r["flash"][0]["perplexity"] > 0
    res = bench.main(["--model", NAME, "--quick", "--rows", "windowing", "--dram-budget", "min", "--no-probe",
                      "--quiet"])
    assert res["model"] == str(builtin) and res["summary"][bench.key("windowing", "min")]["fits"]
    curve = probe.main(["window", "--model", NAME, "--windows", "1,2", "--tokens", "32", "--seq-len", "16",
                        "--quiet", "--json", str(tmp_path / "w.json")])
    assert [p["window"] for p in curve["points"]] == [1, 2]
    assert json.loads((tmp_path / "w.json").read_text())["model"] == str(builtin)


def test_server_serves_the_prepared_copy(builtin, monkeypatch):
    served = {}

    class NoServe:  # main() up to serve_forever, without a socket
        url = "http://test"

        def serve_forever(self):
            pass

        def server_close(self):
            pass

    monkeypatch.setattr(server, "make_server", lambda engine, *a, **k: served.update(engine=engine) or NoServe())
    server.main(["--model", NAME, "--mode", "flash", "--port", "0", "--quiet"])
    engine = served["engine"]
    assert engine.model_id == NAME and engine.mode == "flash" and engine.model.flash_plan.model > 0
    engine.model.flash_reader.close()


def test_concurrent_preparations_take_turns(builtin, tmp_path, monkeypatch):
    """Two preparations of one folder at once: the second waits, then finds it done."""
    calls = []
    real = prepare.convert
    monkeypatch.setattr(prepare, "convert", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder, errors = tmp_path / "copy", []

    def run():
        try:
            prepare.prepare(NAME, folder, announce=lambda msg: None)
        except Exception as e:  # reported below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and calls == [1] and FlashConfig.load(folder).predictors is not None


@pytest.mark.parametrize("arch,quantized,quantize", [("qwen3", True, None), ("llama", False, None),
                                                     ("phi3", True, None), ("relu", False, None), ("qwen3", False, 4)])
def test_estimate_from_config_alone_matches_the_prepared_folder(tmp_path, arch, quantized, quantize):
    """prepare --estimate reads config.json only; its sizes are those convert writes and its budget checks
    count, and its flash plan is the plan of the prepared folder when the shares are the calibrated ones."""
    import json

    import mlx.core as mx

    from arch_models import make_arch
    from mlx_flash.convert import convert
    from mlx_flash.flash.attach import plan_flash, trained_predictors
    from mlx_flash.flash.budget import model_bytes
    from mlx_flash.format import RESIDENT_FILE, FlashConfig
    from mlx_flash.load import load_resident
    from mlx_flash.train_predictors import train

    src = make_arch(tmp_path / arch, arch, quantized=quantized, **({"bits": 4, "group_size": 64} if quantized else {}))
    config = prepare.read_config(str(src))
    out = convert(str(src), tmp_path / "flash", quiet=True, quantize=quantize)
    train(out, tokens=512, seq_len=64, epochs=1, progress=False)
    cfg = FlashConfig.load(out)
    p = cfg.predictors
    e = prepare.estimate(config, predicted=float(np.mean(p["predicted_share"])),
                         held=float(np.mean(p["window_union_p99"])) / cfg.d_ff, quantize=quantize)
    assert e["resident"] == sum(v.nbytes for v in mx.load(str(out / RESIDENT_FILE)).values())
    assert e["ffn_on_disk"] == cfg.file_size
    assert abs(e["model"] - model_bytes(out, cfg)) <= (out / RESIDENT_FILE).stat().st_size - e["resident"]  # header
    with pytest.raises(FlashError, match=f"need {e['convert'] / 1e6:.1f} MB"):  # convert's own check, same bytes
        convert(str(src), tmp_path / "never", dram_budget="1K", quiet=True, quantize=quantize)
    model, down_bias = load_resident(out, cfg)
    predictors, _ = trained_predictors(out, cfg)
    real = plan_flash(model, out, cfg, down_bias, predictors)
    # the same plan but for the per-layer shares, which the estimate takes as their mean
    assert abs(e["flash"] - real.total) / real.total < 0.05, (e["flash"], real.total)
    assert json.loads((src / "config.json").read_text())["model_type"] == config["model_type"]


def test_estimate_command_for_the_readme_models():
    """The README's figures: `prepare --estimate` on the configs in models/configs, offline."""
    for name in ("qwen3-8b-4bit", "prosparse-llama-2-7b", "opt-6.7b"):
        r = subprocess.run([sys.executable, "-m", "mlx_flash.prepare", "--model", f"models/configs/{name}.json",
                            "--estimate"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert "flash mode:" in r.stdout and "convert:" in r.stdout and "calibrate:" in r.stdout


@pytest.mark.parametrize("extra", [["--estimate"], []])
def test_a_hub_id_without_the_hub_is_one_line(tmp_path, extra):
    """The README's Hub commands, where the Hub cannot be reached (as here): one line, nothing written."""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "mlx_flash.prepare", "--model", "mlx-community/Qwen3-8B-4bit",
                        "--out", str(tmp_path / "q"), *extra], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "Hugging Face Hub" in errors[0], r.stderr
    assert not (tmp_path / "q").exists()
