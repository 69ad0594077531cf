"""Preparing a model within a DRAM budget: convert and calibration work one layer at a time.

The proof (slow): a synthetic Llama of 1.3 GB, nearly all of it FFN, is converted, calibrated and
run in flash mode by the README's command sequence, each command in a memory cgroup (v1) whose
limit is below the model's size; the kernel, not our bookkeeping, says whether it fitted.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from flash_fixtures import direct_io_works
from mlx_flash.bench.cgroup import cgroup_root
from mlx_flash.errors import FlashError
from mlx_flash.flash.budget import calibration_parts, calibration_tokens
from mlx_flash.flash.predictor import default_ranks
from mlx_flash.flash.sparsity import record_layers, token_windows
from mlx_flash.format import RESIDENT_FILE, FlashConfig
from mlx_flash.load import LayerLoader, load_flash, load_resident
from mlx_flash.sizes import parse_size
from mlx_flash.sources import load_tokenizer
from mlx_flash.system import drop_cache
from test_errors import assert_one_line_error, run
from tiny_models import make_llama

# 24 layers of 3 x 512 x 8192 float32 FFN weights (50 MB each), 2.6 MB of attention each
BIG = dict(hidden_act="relu", hidden_size=512, intermediate_size=8192, num_hidden_layers=24,
           num_attention_heads=8, num_key_value_heads=2)
BUDGET = "600M"
SLACK = 64 << 20  # what the budget leaves out beside the interpreter: thread stacks, malloc arenas
IMPORTS = ("import mlx.core, mlx_lm, mlx_flash.convert, mlx_flash.train_predictors, mlx_flash.generate; "
           "from mlx_flash.sources import load_tokenizer; load_tokenizer({!r})")


def test_record_layers_matches_the_dense_model_one_layer_at_a_time(tiny_flash):
    folder = tiny_flash("llama_relu_untied")
    cfg = FlashConfig.load(folder)
    windows = token_windows(load_tokenizer(folder), "The quick brown fox jumps over the lazy dog. " * 40, 96, 32)
    dense, _ = load_flash(folder, "dense")
    model, down_bias = load_resident(folder, cfg)
    loader = LayerLoader(folder, cfg, model.ffn_spec, down_bias)
    seen, xs = [], []

    def on_layer(a):
        seen.append(a.layer)
        assert a.prev_x is (xs[-1] if xs else None)  # the previous layer's inputs, kept for lookahead
        xs.append(a.x)
        want = np.abs(np.array(dense.layers[a.layer].mlp.activations(mx.array(a.x.astype(np.float32)))))
        np.testing.assert_allclose(a.h.astype(np.float32), want, rtol=2e-3, atol=2e-3)

    record_layers(model, windows, loader, on_layer, chunk=40)  # chunks that straddle sequences
    loader.close()
    assert seen == list(range(cfg.n_layers))
    assert xs[0].shape == (96, cfg.d_model)


def test_convert_refuses_a_budget_below_the_resident_part_and_one_layer(tiny_model, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run("mlx_flash.convert", "--model", str(tiny_model("opt_pre_ln")), "--out", str(out),
                     "--dram-budget", "10K")
    assert_one_line_error(rc, err, "cannot convert", "resident weights", "one FFN layer")
    rc, _, err = run("mlx_flash.convert", "--model", "smollm2-135m", "--out", str(out), "--dram-budget", "50M")
    assert_one_line_error(rc, err, "cannot convert", "GGUF file (MLX reads it whole)")  # before reading it
    assert list(tmp_path.iterdir()) == []


def test_calibration_checks_the_budget_and_sizes_its_tokens(tiny_flash, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_flash("llama_silu_tied"), folder)
    rc, _, err = run("mlx_flash.train_predictors", "--model", str(folder), "--dram-budget", "10K")
    assert_one_line_error(rc, err, "cannot calibrate", "one FFN layer", "activations of 2048 tokens")
    assert FlashConfig.load(folder).predictors is None

    cfg = FlashConfig.load(folder)
    ranks = default_ranks(cfg.n_layers, cfg.d_model)
    resident = (folder / RESIDENT_FILE).stat().st_size
    fixed = sum(calibration_parts(cfg, resident, ranks, 0, 128).values())
    room = sum(calibration_parts(cfg, resident, ranks, 640, 128).values())  # room for 640 tokens, 5 sequences
    assert calibration_tokens(folder, cfg, ranks, None, 2048, 128, room) == 640  # the default, sized down
    assert calibration_tokens(folder, cfg, ranks, 256, 2048, 128, room) == 256
    with pytest.raises(FlashError, match="at most 640 tokens fit: pass --tokens 640"):
        calibration_tokens(folder, cfg, ranks, 1024, 2048, 128, room)
    with pytest.raises(FlashError, match="cannot calibrate"):
        calibration_tokens(folder, cfg, ranks, None, 2048, 128, fixed + 1)
    assert calibration_tokens(folder, cfg, ranks, None, 2048, 128, None) == 2048


def make_cgroup() -> Path:
    try:
        root = cgroup_root()
    except FlashError as e:
        pytest.fail(f"this proof needs a memory cgroup (v1): {e}")
    cg = root / f"mlx-flash-test-{os.getpid()}"
    try:
        cg.mkdir()
        (cg / "memory.swappiness").write_text("0")
    except OSError as e:
        pytest.fail(f"cannot create the memory cgroup {cg} ({e.strerror}): this proof needs root and a writable "
                    f"cgroup v1 hierarchy")
    return cg


# Runs a command in the cgroup from a small process outside it: a process's peak RSS (wait4) counts
# the memory of the process it was forked from until it exec'd, which must not be this test's.
LAUNCHER = """
import json, os, subprocess, sys
cg, log, *cmd = sys.argv[1:]
join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'  # the shell joins, then becomes the command: same process
with open(log, "w") as out:
    p = subprocess.Popen(["sh", "-c", join, cg, *cmd], stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "rss": usage.ru_maxrss * 1024}))
"""


def run_in(cg: Path, log: Path, *args) -> dict:
    """Run `python *args` alone in the emptied cgroup; its exit status, peak RSS and the cgroup's counters."""
    (cg / "memory.force_empty").write_text("0")  # page cache left by the previous command
    for counter in ("memory.max_usage_in_bytes", "memory.failcnt"):
        (cg / counter).write_text("0")
    p = subprocess.run([sys.executable, "-c", LAUNCHER, str(cg), str(log), sys.executable, *args],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    oom = dict(line.split() for line in (cg / "memory.oom_control").read_text().splitlines())
    return {**json.loads(p.stdout), "output": log.read_text(),
            "max_usage": int((cg / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((cg / "memory.failcnt").read_text()), "oom_kill": int(oom.get("oom_kill", 0))}


@pytest.mark.slow
def test_a_model_larger_than_the_memory_limit_is_converted_calibrated_and_run(tmp_path):
    if not direct_io_works(tmp_path):
        pytest.fail(f"{tmp_path} is on a filesystem without direct I/O (tmpfs?): run pytest with --basetemp on a disk")
    cg = make_cgroup()
    src, flash = tmp_path / "src", tmp_path / "flash"
    try:
        make_llama(src, shard_layers=2, **BIG)  # shard by shard: this process never holds the model
        source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        for f in src.glob("*.safetensors"):
            drop_cache(f)  # cold, so that reading it is charged to the commands
        base = run_in(cg, tmp_path / "baseline.log", "-c", IMPORTS.format(str(src)))
        assert base["rc"] == 0, base["output"]
        limit = parse_size(BUDGET) + base["max_usage"] + SLACK
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        assert source_bytes > limit

        budget = ["--dram-budget", BUDGET]
        steps = {
            "convert": ["-m", "mlx_flash.convert", "--model", str(src), "--out", str(flash), *budget],
            "calibrate": ["-m", "mlx_flash.train_predictors", "--model", str(flash), *budget, "--tokens", "128",
                          "--seq-len", "64", "--rank", "16", "--last-layers-rank", "16", "--epochs", "10"],
            "generate": ["-m", "mlx_flash.generate", "--model", str(flash), "--mode", "flash", *budget,
                         "--recall", "0.5", "-p", "Once upon a time", "--max-tokens", "4"],  # memory, not quality
        }
        results = {}
        for name, args in steps.items():
            r = results[name] = run_in(cg, tmp_path / f"{name}.log", *args)
            assert r["rc"] == 0, f"{name} failed inside the {limit / 1e6:.0f} MB cgroup:\n{r['output'][-3000:]}"
        flash_bytes = sum(f.stat().st_size for f in flash.iterdir())
        summary = {"source_bytes": source_bytes, "flash_bytes": flash_bytes, "limit": limit, "budget": BUDGET,
                   "baseline": base["max_usage"], "baseline_rss": base["rss"],
                   **{f"{n}_{k}": r[k] for n, r in results.items() for k in ("max_usage", "rss", "failcnt")}}
        print("\nwithin-budget proof:", json.dumps(summary))
        print(results["generate"]["output"].splitlines()[-1])

        assert flash_bytes > limit
        assert re.search(r"generation: [1-9]\d* tokens", results["generate"]["output"]), results["generate"]["output"]
        for name, r in results.items():
            assert r["max_usage"] <= limit and r["oom_kill"] == 0, (name, r)
            # failcnt counts every time usage met the limit, even when the kernel only reclaimed page cache
            assert r["failcnt"] == 0, f"{name} reached the cgroup's limit (the kernel had to reclaim): {r}"
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(flash, ignore_errors=True)
        try:
            cg.rmdir()
        except OSError:
            pass
