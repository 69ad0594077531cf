"""A model pipelined over two ranks on localhost (mlx_flash.launch -> mlx.launch --backend ring -n 2):
the same tokens and logits as one process, dense and flash, on two architectures; per-rank files;
a dead, a stopped and a misconfigured rank each end the run with one line and a non-zero exit."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.sample_utils import make_sampler

from mlx_flash.generate import stream
from mlx_flash.load import load, load_flash
from mlx_flash.pipeline import generate_tokens, prefill_chunk
from mlx_flash.split import split
from tiny_models import make_llama, make_opt

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64, 81, 200, 9]
NEW = 10
FLASH = {"prefill_step": 5}  # the prompt in three chunks
MODELS = {  # name: (maker, convert's options)
    "opt": (lambda d: make_opt(d, do_layer_norm_before=True, num_hidden_layers=4, seed=0), {}),
    # float16 embeddings (tied: on both ranks) and float32 norms: the hidden states passed on are float32
    "llama": (lambda d: make_llama(d, hidden_act="relu", tie_word_embeddings=True, num_hidden_layers=4, seed=0),
              {"dtype": "float16"}),
}


@pytest.fixture(scope="module")
def split_models(tmp_path_factory):
    """name -> (whole folder, its copy for the ranks' prefix): 4 layers, trained predictors, split in two."""
    from mlx_flash.convert import convert
    from mlx_flash.train_predictors import train

    root = tmp_path_factory.mktemp("pipeline")
    out = {}
    for name, (make, options) in MODELS.items():
        make(root / f"{name}-src")
        whole = convert(str(root / f"{name}-src"), root / name, quiet=True, **options)
        train(whole, tokens=2048, seq_len=128, epochs=4, progress=False)
        split(whole, 2, root / f"{name}-split", quiet=True)  # the ranks' folders: <prefix>-rank<r>-of-2
        out[name] = whole, root / f"{name}-split"
    return out


def launch(*command, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "mlx_flash.launch", "--ranks", "2", "--", *command], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def per_layer_reads(model) -> dict:
    """Count the bytes the model's reader reads, by layer (every read names its layer first)."""
    reader, counts = model.flash_reader, {}
    for name in ("read", "read_into", "read_layer_all"):
        method = getattr(reader, name)

        def counted(layer, *args, _method=method, **kw):
            before = reader.stats.bytes_read
            out = _method(layer, *args, **kw)
            counts[layer] = counts.get(layer, 0) + reader.stats.bytes_read - before
            return out

        setattr(reader, name, counted)
    return counts


def reference(folder, mode):
    """One process: (tokens, logits, bytes read per layer) of the same loop, and generate.stream's tokens."""
    model, _ = load_flash(folder, mode, **(FLASH if mode == "flash" else {}))
    counts = per_layer_reads(model) if mode == "flash" else {}
    tokens, logits = [], []
    for token, lg in generate_tokens(model, PROMPT, NEW, make_sampler(temp=0.0), prefill_chunk(model)):
        tokens.append(token)
        logits.append(np.array(lg.astype(mx.float32))[0])
    net, tok = load(str(folder), mode, **(FLASH if mode == "flash" else {}))
    streamed = [r.token for r in stream(net, tok, PROMPT, max_tokens=NEW)]
    return tokens, np.array(logits), counts, streamed


@pytest.mark.parametrize("name", list(MODELS))
def test_two_ranks_equal_one_process(split_models, name, tmp_path):
    whole, prefix = split_models[name]
    hidden = whole.with_name(whole.name + "-away")  # the ranks can read only their own folders
    whole.rename(hidden)
    try:
        p = launch("tests/pipeline_rank.py", str(prefix), str(tmp_path), ",".join(map(str, PROMPT)), str(NEW),
                   "dense,flash", *(f"{k}={v}" for k, v in FLASH.items()))
    finally:
        hidden.rename(whole)
    assert p.returncode == 0, p.stderr
    for mode in ("dense", "flash"):
        tokens, logits, counts, streamed = reference(whole, mode)
        assert tokens[: len(streamed)] == streamed  # the loop is generate.stream's
        ranks = [np.load(tmp_path / f"rank{r}-{mode}.npz") for r in range(2)]
        for r in ranks:
            assert list(r["tokens"]) == tokens
        np.testing.assert_array_equal(ranks[1]["logits"], logits)  # bit for bit: the same operations
        if mode == "flash":
            for r, (a, b) in enumerate([(0, 2), (2, 4)]):
                assert str(ranks[r]["folder"]) == str(prefix) + f"-rank{r}-of-2"
                assert int(ranks[r]["bytes_read"]) == sum(counts.get(l, 0) for l in range(a, b)) > 0


def test_generate_command_prints_the_one_process_text(split_models):
    whole, prefix = split_models["opt"]
    p = launch("generate", "--model", str(prefix), "--mode", "flash", "--pipeline", "-p", "hello world", "-m", "8")
    assert p.returncode == 0, p.stderr
    model, tok = load(str(whole), "flash")
    assert p.stdout == "".join(r.text for r in stream(model, tok, "hello world", max_tokens=8)) + "\n"
    lines = p.stderr.splitlines()
    assert lines[0].startswith("rank 0: layers 0-1 | resident") and lines[1].startswith("rank 1: layers 2-3 |")
    assert any(l.startswith("rank 1 (layers 2-3): busy") and "bytes sent/token" in l for l in lines)


def test_the_server_on_rank_0_answers_as_one_process(split_models, tmp_path):
    whole, prefix = split_models["opt"]
    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "mlx_flash.launch", "--ranks", "2", "--", "server", "--model",
                              str(prefix), "--mode", "flash", "--pipeline", "--port", "0", "--quiet"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=f, stdin=subprocess.DEVNULL, text=True)
    try:
        url = p.stdout.readline().split(" on ")[-1].strip()  # "serving opt on http://127.0.0.1:PORT"
        assert url.startswith("http://"), err.read_text()

        def complete(prompt, **kw):
            body = json.dumps({"prompt": prompt, "max_tokens": 6, "temperature": 0, **kw}).encode()
            try:
                with urllib.request.urlopen(f"{url}/v1/completions", body, timeout=60) as r:
                    return json.loads(r.read())["choices"][0]
            except urllib.error.HTTPError as e:
                raise AssertionError(f"{e}: {e.read()}\n{err.read_text()}")

        model, tok = load(str(whole), "flash")
        want = "".join(r.text for r in stream(model, tok, "hello world", max_tokens=6))
        assert complete("hello world") == {"index": 0, "text": want, "logprobs": None, "finish_reason": "length"}
        stop = want[2:4]
        cut = complete("hello world", stop=[stop])  # rank 0 stops early: the others are told
        assert cut == {"index": 0, "text": want[: want.index(stop)], "logprobs": None, "finish_reason": "stop"}
        want = "".join(r.text for r in stream(model, tok, "the other ranks follow", max_tokens=6))
        assert complete("the other ranks follow")["text"] == want
    finally:
        p.terminate()
        assert p.wait(timeout=30) != 0


@pytest.mark.parametrize("args, says", [
    (["--model", "{prefix}-rank1-of-2"], "error: rank 0: {prefix}-rank1-of-2 holds rank 1's layers 2-3, not this"),
    (["--model", "{prefix}", "--mode", "flash", "--dram-budget", "10K"], "error: rank 0: a DRAM budget of 0.0 MB "
                                                                         "cannot hold this model in flash mode"),
])
def test_a_rank_refuses_another_ranks_folder_or_a_budget_it_cannot_meet(split_models, args, says):
    _, prefix = split_models["llama"]
    p = launch("generate", *(a.format(prefix=prefix) for a in args), "--pipeline", "-m", "2", timeout=60)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert errors[0].startswith(says.format(prefix=prefix)), errors[0]


def test_ranks_of_different_splits_refuse(split_models, tmp_path):
    mixed = tmp_path / "mixed"  # rank 0's folder from the OPT split, rank 1's from the Llama one
    (tmp_path / "mixed-rank0-of-2").symlink_to(f"{split_models['opt'][1]}-rank0-of-2")
    (tmp_path / "mixed-rank1-of-2").symlink_to(f"{split_models['llama'][1]}-rank1-of-2")
    p = launch("generate", "--model", str(mixed), "--pipeline", "-m", "2", timeout=60)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert errors[0].startswith("error: rank 1: ") and "another split or model than rank 0's" in errors[0]


def rank_pid(root_pid: int, rank: int) -> int:
    """The process of `rank` among the launcher's descendants (mlx.launch sets MLX_RANK)."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and b"mlx_flash.generate" in cmd and b"--pipeline-timeout" in cmd:
            return pid
    return 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_silent_rank_ends_the_run_in_one_line(split_models, sig, tmp_path):
    _, prefix = split_models["opt"]
    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "mlx_flash.launch", "--ranks", "2", "--", "generate", "--model",
                              str(prefix), "--pipeline", "-m", "100000", "--pipeline-timeout", "2"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while "rank 1: layers" not in err.read_text() and time.monotonic() < deadline:  # generating by now
            time.sleep(0.1)
        pid = rank_pid(p.pid, 1)
        assert pid, err.read_text()
        os.kill(pid, sig)
        t = time.monotonic()
        rc = p.wait(timeout=30)
        took = time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
    errors = [l for l in err.read_text().splitlines() if l.startswith("error:")]
    assert rc != 0 and "Traceback" not in err.read_text() and len(errors) == 1, err.read_text()
    if sig == signal.SIGKILL:  # the others notice at once
        assert "rank 1" in errors[0] and took < 10
    else:  # the watchdog: 2 s, then the launcher's grace for the stopped rank
        assert errors[0].startswith("error: rank 0: waiting for") and "within 2 s" in errors[0] and took < 20


def test_the_benchmark_runs_and_counts_the_bytes_passed(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "mlx_flash.bench.pipeline", "--geometry", "tiny-ffn", "--layers", "4",
                        "--share", "1000%", "--tokens", "2", "--settle", "1", "--no-cgroup", "--dir",
                        str(tmp_path / "syn"), "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = np.array(res["ranks"]["rows"])
    assert rows[:, :2].tolist() == [[0, 2], [2, 4]]
    assert rows[:, 9].tolist() == [256 * 4, 4]  # per token: a float32 hidden state of d_model 256; the token
    assert "| pipeline, 2 ranks |" in p.stdout and len(res["targets"]) == 2
    assert {k.split("@")[0] for k in res["single"]} == {"naive", "all"}

