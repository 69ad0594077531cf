"""Peer mode: llama.cpp beside our rows, in a memory cgroup of the same total limit, on the same weights.

    python -m mlx_flash.bench --peer [--models smollm2-135m,llama-1b-L4] [--limits min,0.5,0.75,1,1.5,2,3]
        [--prompt-tokens 32] [--gen-tokens 32] [--repeats 3] [--json out.json] [--plots DIR] [--report out.json]

A user with a model bigger than memory would otherwise run llama.cpp, which mmaps the GGUF and
lets the page cache decide. `make peer` builds its `llama-bench` (bench.peer_build); without it
this command says so in one line.

The weights are the same file for both: the built-in model's GGUF (the one `convert` reads), and
for a synthetic geometry a GGUF written by bench.peer_model with gguf-py's GGUFWriter (Llama architecture, random
weights, Q4_1 like the built-in model's, its tokenizer borrowed), which `prepare` converts and
calibrates as it would any GGUF. A `.gguf` path works too.

The memory limit is one number per point, the total a process may hold: each --limits value is a
share of the GGUF file's size (or bytes: 150M). llama.cpp runs in a memory cgroup (v1) with that
limit, its weights mmapped (its default), the file's pages dropped from the page cache first. Our
rows (dense without a limit; naive mmap and flash under it) run in a child process per limit inside
a cgroup, as `bench --cgroup` runs them: the child's baseline (its cgroup usage once the interpreter,
MLX and mlx-lm are loaded, before any weight) and --cgroup-slack come off the limit, and the rest is
the rows' budget:  budget = limit - baseline - slack  (`budget_for`). So both processes get the same
memory, and the interpreter's share of it is counted against us, as it is on a user's machine.
`min` in --limits adds, per row, the smallest limit its plan accepts (flash: rows.min_flash_budget;
naive: resident weights and one streamed layer), from the unlimited child's baseline, plus 4 MiB;
llama.cpp runs there too, so each table shows both at the smallest memory ours can run in.

Per row: decode and prompt tokens/s, peak memory (the cgroup's `max_usage_in_bytes`: the process's
memory and the page cache it was charged for), and bytes read from storage per decode token. For
llama.cpp the bytes come from the kernel's count for the child (`wait4`'s rusage, ru_inblock: the
same counter as /proc/<pid>/io's read_bytes, page faults on the map included), as the difference
of two runs, prompt then decode and prompt alone, over the decode tokens (llama-bench warms up
with one token, then runs --repeats x --gen-tokens). Ours: /proc/self/io over the timed tokens.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import FlashError
from ..sizes import parse_size
from .peer_build import binary, peer_dir
from .peer_model import GEOMETRIES, resolve_model

DEFAULT_MODELS = "smollm2-135m,llama-1b-L4"
DEFAULT_LIMITS = "min,0.5,0.75,1,1.5,2,3"
DEFAULTS = {"prompt_tokens": 32, "gen_tokens": 32, "repeats": 3}
QUICK = {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1}
OUR_ROWS = {"dense": "dense (MLX, no limit)", "naive": "naive mmap (MLX)", "windowing": "flash (MLX)"}
PEER_LABEL = "llama.cpp (mmap)"
MIN_MARGIN = 4 << 20  # added to a row's smallest limit: the baseline of the child that runs it may be higher
PEER_TIMEOUT = 600  # seconds a llama-bench run may take (at a limit far below the file it thrashes)
NOT_BUILT = "peer not built: run `make peer` (builds llama.cpp's llama-bench into .peer/, about 5 minutes on 2 cores)"


# MARK: - the memory limit


def parse_limits(text: str, model_size: int, allow_none: bool = False) -> Dict[str, int]:
    """--limits: shares of the model file (1.5) or sizes (150M), each the total a process may hold ('min',
    the smallest each of our rows' plans accepts, is run()'s)."""
    out = {}
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            share = float(item)
        except ValueError:
            try:
                out[item] = parse_size(item)
            except (FlashError, ValueError):
                raise FlashError(f"--limits: '{item}' is neither a share of the model (1.5) nor a size (150M)")
            continue
        if share <= 0:
            raise FlashError(f"--limits: {item} is not a positive share of the model")
        out[f"{share:g}x"] = int(share * model_size)
    if not out and not allow_none:
        raise FlashError("--limits: no limit given")
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def budget_for(limit: int, baseline: int, slack: int) -> int:
    """Our rows' budget under a total limit: what is left once the interpreter's baseline and the slack
    for thread stacks and Python objects are counted (bench.cgroup: limit = budget + baseline + slack)."""
    return limit - baseline - slack


# MARK: - llama.cpp's llama-bench


def bench_command(exe: Path, gguf_path: Path, prompt: int, gen: int, repeats: int, threads: int) -> List[str]:
    """llama-bench with mmap (its default, said explicitly), JSON on stdout."""
    return [str(exe), "-m", str(gguf_path), "-p", str(prompt), "-n", str(gen), "-r", str(repeats),
            "-t", str(threads), "-lm", "mmap", "-o", "json"]


def parse_llama_bench(text: str) -> dict:
    """llama-bench's `-o json` (a list, one entry per test: prompt processing has n_gen 0, generation
    n_prompt 0) -> prompt and decode tokens/s with their samples, and what it ran."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise FlashError(f"llama-bench's output is not JSON ({e.msg} at character {e.pos})")
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "avg_ts" in t for t in tests):
        raise FlashError("llama-bench's output is not its list of tests with avg_ts")
    out = {"prompt_tok_s": None, "decode_tok_s": None}
    for t in tests:
        kind = "decode" if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0 else "prompt"
        out[f"{kind}_tok_s"] = float(t["avg_ts"])
        out[f"{kind}_tokens"] = int(t["n_gen"] if kind == "decode" else t["n_prompt"])
        out[f"{kind}_samples_tok_s"] = [float(x) for x in t.get("samples_ts", [])]
    first = tests[0] if tests else {}
    out.update(build=f"{first.get('build_commit', '?')} ({first.get('build_number', '?')})",
               threads=first.get("n_threads"), model_size=first.get("model_size"), use_mmap=first.get("use_mmap"),
               cpu=first.get("cpu_info"), backend=first.get("backends"))
    return out


def run_limited(cmd: List[str], limit: Optional[int], files: List[Path], timeout: float = PEER_TIMEOUT) -> dict:
    """`cmd` in a fresh memory cgroup of `limit` bytes (None: no limit), `files` dropped from the page
    cache first, killed after `timeout` seconds; its stdout, exit status, the cgroup's peak and failcnt,
    the bytes it read from storage."""
    import threading

    from ..system import drop_cache
    from .cgroup import make_cgroup

    for f in files:
        drop_cache(f)
    cg = make_cgroup()
    err = tempfile.TemporaryFile()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit) if limit else "-1")
        join = lambda: (cg / "cgroup.procs").write_text(str(os.getpid()))  # in the child, before exec
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, preexec_fn=join)
        timer = threading.Timer(timeout, p.kill)  # a limit where it thrashes for ever
        timer.start()
        stdout = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        timed_out = not timer.is_alive()
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
        return {"returncode": p.returncode, "timed_out": timed_out, "stdout": stdout.decode(errors="replace"), "seconds": time.perf_counter() - t0,
                "last_error": lines[-1] if lines else "", "disk_bytes": usage.ru_inblock * 512,
                "peak_rss_bytes": usage.ru_maxrss * 1024, "limit": limit,
                "peak_cgroup_bytes": int((cg / "memory.max_usage_in_bytes").read_text()),
                "failcnt": int((cg / "memory.failcnt").read_text())}
    finally:
        err.close()
        try:
            cg.rmdir()
        except OSError:
            pass


def peer_row(gguf_path: Path, limit: Optional[int], prompt: int, gen: int, repeats: int, threads: int,
             exe: Optional[Path] = None, timeout: float = PEER_TIMEOUT) -> dict:
    """llama.cpp at one limit: a run of prompt then decode, and one of the prompt alone (its bytes)."""
    exe = exe or binary("llama-bench")
    if not exe.exists():
        return {"row": "llama.cpp", "fits": False, "reason": NOT_BUILT}
    full = run_limited(bench_command(exe, gguf_path, prompt, gen, repeats, threads), limit, [gguf_path], timeout)
    if full["returncode"] != 0:
        killed = full["returncode"] < 0 or full["returncode"] == 137
        why = (f"did not finish in {timeout:.0f} s" if full["timed_out"] else
               "killed by the kernel's OOM killer at this limit" if killed else full["last_error"])
        return {"row": "llama.cpp", "fits": False, "reason": f"llama-bench failed (exit status {full['returncode']}): "
                f"{why}", "limit": limit}
    parsed = parse_llama_bench(full["stdout"])
    alone = run_limited(bench_command(exe, gguf_path, prompt, 0, repeats, threads), limit, [gguf_path], timeout)
    decode_tokens = 1 + repeats * gen  # llama-bench's one-token warm-up, then its repetitions
    disk = (full["disk_bytes"] - alone["disk_bytes"]) / decode_tokens if alone["returncode"] == 0 else None
    return {"row": "llama.cpp", "fits": True, **parsed, "limit": limit, "peak_cgroup_bytes": full["peak_cgroup_bytes"],
            "peak_rss_bytes": full["peak_rss_bytes"], "failcnt": full["failcnt"],
            "disk_bytes_per_token": None if disk is None else max(disk, 0.0), "disk_bytes_run": full["disk_bytes"]}


# MARK: - our rows, one child process per limit inside a cgroup


def our_rows(folder: Path, limits: Dict[str, int], args) -> dict:
    """dense (no limit), then naive and flash at each limit, each limit in a child process of its own inside
    a memory cgroup (bench.cgroup's spawn): the child sets the rows' budget from its own baseline, and a
    row the kernel kills at one limit costs that limit's figures only. With --limits min, `limits` gains
    the smallest limit each of naive's and flash's plans accepts, from the unlimited child's figures."""
    out = {"runs": {}, "notes": {}}
    first = spawn_child(folder, "-", None, ["dense"] if "dense" in args.rows else [], args, out)
    if first is not None and args.min_limits:
        for row, need in first["min_budgets"].items():
            if row in args.rows and need is not None:
                limits[f"{row} min"] = limit_for(need, first["baseline_bytes"], args.cgroup_slack)
        ordered = dict(sorted(limits.items(), key=lambda kv: kv[1]))  # ascending, the mins in their place
        limits.clear()
        limits.update(ordered)
    rows = [r for r in args.rows if r != "dense"]
    for label, limit in limits.items():
        if "baseline_bytes" in out and budget_for(limit, out["baseline_bytes"], args.cgroup_slack) <= 0:
            out["notes"][label] = (f"the interpreter's baseline ({out['baseline_bytes'] / 1e6:.1f} MB, measured in the "
                                   f"dense row's child) and the slack alone exceed the limit")
            continue
        if rows:
            spawn_child(folder, label, limit, rows, args, out)
    return out


def spawn_child(folder: Path, label: str, limit: Optional[int], rows: List[str], args, out: dict) -> Optional[dict]:
    """One child inside a fresh memory cgroup, its runs and notes added to `out` under `label`."""
    from ..system import drop_cache
    from .cgroup import make_cgroup, spawn

    for f in ("ffn.bundles", "resident.safetensors"):  # cold, and charged to the child's cgroup when read
        if (folder / f).exists():
            drop_cache(folder / f)
    cg = make_cgroup()
    path = Path(tempfile.mkdtemp(prefix="mlx-flash-peer-")) / "child.json"
    argv = ["--peer", "--peer-child", str(cg), "--peer-limit", str(limit or 0), "--json", str(path),
            "--models", str(folder), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
            str(args.gen_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
            "--cgroup-slack", str(args.cgroup_slack), "--rows", ",".join(rows) or "-"]
    what = [OUR_ROWS[r] + ("" if limit is None else f" at {limit / 1e6:.1f} MB") for r in rows] or [
        "the baseline and the plans' smallest budgets"]
    try:
        res = spawn(cg, path, argv, what)
    except FlashError as e:  # the child was killed: a row needed more than the limit
        out["notes"][label] = f"the child process failed at this limit ({str(e).split(';')[0]})"
        return None
    for k, runs in res["runs"].items():
        out["runs"][f"{k.split('@')[0]}@{label}"] = runs
    out["notes"].update({label: res["note"]} if res.get("note") else {})
    out.update(baseline_bytes=res["baseline_bytes"], baseline_rss_bytes=res["baseline_rss_bytes"],
               slack_bytes=res["slack_bytes"])
    return res


def child(args):
    """Inside the cgroup: the baseline before any weight, then the rows at budget = limit - baseline - slack
    (dense: no limit)."""
    from .cgroup import measure_baseline
    from .rows import load_setup, run_all
    from .same_budget import baseline_weights

    cg = Path(args.peer_child)
    measured = {}
    s = load_setup(args.models, args.prompt_tokens, args.gen_tokens, threads=args.threads, evict=False,
                   before_weights=lambda: measured.update(measure_baseline(cg, args.threads)))
    s.cgroup, s.baseline, s.slack = cg, measured["cgroup"], args.cgroup_slack
    out = {"runs": {}, "note": None, "baseline_bytes": s.baseline, "baseline_rss_bytes": measured["rss"],
           "slack_bytes": s.slack}
    rows, budget = list(args.rows), budget_for(args.peer_limit, s.baseline, s.slack)
    if not args.peer_limit:
        out["min_budgets"] = min_budgets(s)
    if args.peer_limit and budget <= 0:
        out["note"] = (f"the interpreter's baseline ({s.baseline / 1e6:.1f} MB) and the slack ({s.slack / 1e6:.0f} MB) "
                       f"alone exceed the limit")
        rows = []
    weights, why = baseline_weights(s, budget) if "naive" in rows else (0, None)
    if why:  # naive's plan cannot fit: said, not run
        rows.remove("naive")
        out["runs"]["naive@-"] = [{"row": "naive", "fits": False, "reason": why}]
    if rows:
        res = run_all(s, rows, {"-": budget}, args.repeats, 0, 0, candidates=(0,), progress=False,
                      base_budgets={"-": weights})
        for runs in res["runs"].values():  # the cgroup's peak of the whole process, as llama.cpp's is read
            for r in runs:
                if r.get("peak_cgroup_bytes") is not None:
                    r["peak_total_bytes"] = r["peak_cgroup_bytes"] + s.baseline
        if rows == ["dense"]:  # run_once leaves dense's peak unread; the cgroup kept it (its last repetition)
            res["runs"]["dense@-"][-1]["peak_total_bytes"] = int((cg / "memory.max_usage_in_bytes").read_text())
        out["runs"].update(res["runs"])
    Path(args.json).write_text(json.dumps(out))


def min_budgets(s) -> Dict[str, int]:
    """The smallest budget each row's plan accepts: flash's (rows.min_flash_budget: bisection over its plan),
    naive's (resident weights, one streamed layer, staging, KV cache, working memory: bench.same_budget's rule)."""
    from ..baselines import KINDS, plan_baseline
    from ..flash.attach import resident_facts
    from .rows import clear, min_flash_budget

    clear(s)
    facts = resident_facts(s.model, s.down_bias)
    naive = max(plan_baseline(s.folder, s.cfg, facts, kind, 1 << 62, s.context).fixed for kind in KINDS)
    try:
        flash = min_flash_budget(s)
    except FlashError:  # no predictors, or a plan that holds nothing
        flash = None
    return {"naive": naive, "windowing": flash}


def limit_for(budget: int, baseline: int, slack: int) -> int:
    """The limit that leaves `budget` (budget_for's inverse) plus MIN_MARGIN, rounded up to a MiB: each child
    measures its own baseline, a few MB apart."""
    return -(-(budget + baseline + slack + MIN_MARGIN) // (1 << 20)) << 20


def summarize_ours(child_out: dict) -> Dict[str, dict]:
    """Per `row@limit label`: tokens/s, the cgroup's peak (the child's baseline included), bytes per token."""
    from .report import aggregate

    out = {}
    for key, runs in child_out["runs"].items():
        a = aggregate(runs, None, None)
        row = key.split("@")[0]
        if not a["fits"]:
            out[key] = {"row": row, "fits": False, "reason": a["reason"]}
            continue
        peaks = [r["peak_total_bytes"] for r in runs if r.get("peak_total_bytes") is not None]
        out[key] = {
            "row": row, "fits": True, "decode_tok_s": a["tokens_per_s"],
            "prompt_tok_s": runs[0]["prompt_tokens"] / a["prefill_s"], "ms_per_token": a["ms_total"],
            "disk_bytes_per_token": a["disk_bytes_per_token"], "peak_cgroup_bytes": max(peaks) if peaks else None,
            "peak_mlx_bytes": a["peak_mlx_bytes"], "plan_bytes": a["plan"].get("total")}
    for label, why in child_out["notes"].items():
        for row in ("naive", "windowing"):
            out.setdefault(f"{row}@{label}", {"row": row, "fits": False, "reason": why})
    return out


# MARK: - the command


def setup_arg_parser():
    p = argparse.ArgumentParser(prog="python -m mlx_flash.bench --peer",
                                description="llama.cpp (mmap) beside dense, naive mmap and flash, each process in "
                                            "a memory cgroup of the same total limit, on the same weights.")
    p.add_argument("--peer", action="store_true", help="this mode")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma list: built-in names, synthetic geometries ({', '.join(g for g in GEOMETRIES if g != 'tiny')}) "
                        f"or .gguf files (default {DEFAULT_MODELS})")
    p.add_argument("--limits", default=DEFAULT_LIMITS,
                   help="total memory per process: shares of the model file (1.5) or sizes (150M), and 'min': the "
                        f"smallest limit naive's and flash's plans accept; comma list (default {DEFAULT_LIMITS})")
    p.add_argument("--prompt-tokens", type=int, default=None, help=f"default {DEFAULTS['prompt_tokens']}")
    p.add_argument("--gen-tokens", "-n", type=int, default=None, help=f"default {DEFAULTS['gen_tokens']}")
    p.add_argument("--repeats", "-r", type=int, default=None, help=f"default {DEFAULTS['repeats']}")
    p.add_argument("--rows", default=",".join(OUR_ROWS), help=f"our rows: comma list of {', '.join(OUR_ROWS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="llama.cpp's threads and our read threads (default: the CPU count)")
    p.add_argument("--cgroup-slack", type=parse_size, default=8 << 20,
                   help="taken off our rows' budget for thread stacks and Python objects (default 8M)")
    p.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT,
                   help=f"seconds a llama-bench run may take before it is stopped (default {PEER_TIMEOUT})")
    p.add_argument("--quick", action="store_true", help="tiny settings, for tests and a first look")
    p.add_argument("--json", default=None, help="write every figure to this file")
    p.add_argument("--plots", default=None, help="write latency_vs_limit_<model>.png into this folder")
    p.add_argument("--report", default=None, help="print the tables (and --plots) of an earlier run's --json file")
    p.add_argument("--peer-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-limit", type=int, default=0, help=argparse.SUPPRESS)
    return p


def check_ready(args):
    """Everything a run needs, before anything is prepared: the peer built, a memory cgroup."""
    if not binary("llama-bench").exists():
        raise FlashError(f"{NOT_BUILT}; looked in {peer_dir() / 'bin'}")
    from .cgroup import cgroup_root, make_cgroup

    cgroup_root()
    make_cgroup().rmdir()  # raises the clear message when it cannot be created


def run(argv) -> dict:
    """`python -m mlx_flash.bench --peer ...` (errors are reported by the bench command's wrapper)."""
    from ..flash.budget import model_bytes
    from ..format import FlashConfig
    from .cli import write_outputs

    args = setup_arg_parser().parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip() not in ("", "-")]
    if args.peer_child:
        return child(args)
    if not args.rows or any(r not in OUR_ROWS for r in args.rows):
        raise FlashError(f"--rows: choose from {', '.join(OUR_ROWS)}")
    if min(args.prompt_tokens, args.gen_tokens, args.repeats) < 1:
        raise FlashError("--prompt-tokens, --gen-tokens and --repeats must be at least 1")
    limits_given = [x.strip() for x in args.limits.split(",")]
    args.min_limits = "min" in limits_given
    args.limits = ",".join(x for x in limits_given if x != "min")
    if args.report:  # an earlier run's tables and figures, from its --json
        try:
            result = json.loads(Path(args.report).read_text())
            result["models"][0]["rows"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise FlashError(f"--report {args.report}: not a --json file written by --peer ({e})")
        print_report(result)
        write_outputs(result, None, args.plots, lambda d: plot(result, d))
        return result
    check_ready(args)
    models = [resolve_model(m.strip()) for m in args.models.split(",") if m.strip()]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
              "load_average": [round(os.getloadavg()[0], 1)],
              "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeats": args.repeats,
              "peer_build": json.loads((peer_dir() / "build.json").read_text()) if (peer_dir() / "build.json").exists()
              else None, "models": []}
    for m in models:
        size = m["gguf"].stat().st_size
        limits = parse_limits(args.limits, size, allow_none=args.min_limits)
        print(f"== {m['name']}: our rows at {len(limits)} limits ({', '.join(limits)}) in a memory cgroup ...",
              file=sys.stderr)
        ours = our_rows(Path(m["folder"]), limits, args)
        rows = summarize_ours(ours)
        print(f"== {m['name']}: llama.cpp at the same limits and without one ...", file=sys.stderr)
        for label, limit in [("-", None), *limits.items()]:
            rows[f"llama.cpp@{label}"] = peer_row(m["gguf"], limit, args.prompt_tokens, args.gen_tokens,
                                                  args.repeats, args.threads, timeout=args.peer_timeout)
        cfg = FlashConfig.load(Path(m["folder"]))
        result["models"].append({
            "name": m["name"], "synthetic": m["synthetic"], "gguf": str(m["gguf"]), "gguf_bytes": size,
            "folder": str(m["folder"]), "flash_model_bytes": model_bytes(Path(m["folder"]), cfg),
            "geometry": f"{cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}",
            "limits": limits, "baseline_bytes": ours["baseline_bytes"], "slack_bytes": ours["slack_bytes"],
            "rows": rows, "smallest": smallest(rows, limits)})
    result["load_average"].append(round(os.getloadavg()[0], 1))  # other work on the machine shows in every row
    print_report(result)
    write_outputs(result, args.json, args.plots, lambda d: plot(result, d))
    return result


def smallest(rows: Dict[str, dict], limits: Dict[str, int]) -> Dict[str, dict]:
    """Per row kind, the smallest limit at which it ran, and its decode tokens/s there."""
    out = {}
    for label, limit in limits.items():  # ascending
        for row in ("llama.cpp", "naive", "windowing"):
            a = rows.get(f"{row}@{label}")
            if row not in out and a and a["fits"]:
                out[row] = {"limit_label": label, "limit": limit, "decode_tok_s": a["decode_tok_s"]}
    return out


def row_label(row: str) -> str:
    return PEER_LABEL if row == "llama.cpp" else OUR_ROWS[row]


def print_report(result: dict):
    mb = lambda v: "-" if v is None else f"{v / 1e6:.1f}"
    f2 = lambda v: "-" if v is None else f"{v:.2f}"
    b = result["peer_build"] or {}
    print(f"# mlx-flash peer mode: llama.cpp (mmap) beside our rows, {result['date']}")
    print(f"llama.cpp: llama-bench from {b.get('sdist', '?')} (built {b.get('built', '?')}, CPU, GGML_NATIVE), "
          f"{result['threads']} threads; every process in a memory cgroup (v1) whose limit is the column's; "
          f"{result['prompt_tokens']} prompt tokens, {result['gen_tokens']} decode tokens x {result['repeats']} "
          f"repetition(s) after a warm-up; file pages dropped from the page cache before each process; load "
          f"average {' -> '.join(map(str, result['load_average']))} (start -> end)")
    for m in result["models"]:
        kind = "SYNTHETIC (random weights), " if m["synthetic"] else ""
        print(f"\n## {m['name']}: {kind}{m['geometry']}; GGUF {mb(m['gguf_bytes'])} MB (both runtimes read these "
              f"weights; converted: {mb(m['flash_model_bytes'])} MB)")
        print(f"our rows' budget = limit - the child's baseline {mb(m['baseline_bytes'])} MB (interpreter, MLX, "
              f"mlx-lm, tokenizer) - {mb(m['slack_bytes'])} MB of slack")
        head = ["limit MB (x GGUF)", "row", "decode tok/s", "prompt tok/s", "peak MB (cgroup)", "disk MB/token", "note"]
        print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
        for label, limit in [("-", None), *m["limits"].items()]:
            where = limit_cell(label, limit, m["gguf_bytes"])
            for row in ("llama.cpp", "dense", "naive", "windowing"):
                a = m["rows"].get(f"{row}@{label}")
                if a is None:
                    continue
                if not a["fits"]:
                    print(f"| {where} | {row_label(row)} | - | - | - | - | does not run: {a['reason']} |")
                    continue
                note = f"failcnt {a['failcnt']}" if a.get("failcnt") else ""
                print(f"| {where} | {row_label(row)} | {f2(a['decode_tok_s'])} | {f2(a['prompt_tok_s'])} | "
                      f"{mb(a['peak_cgroup_bytes'])} | {mb(a['disk_bytes_per_token'])} | {note} |")
        print("\n" + side_by_side(m))
        print()
        for row in ("llama.cpp", "naive", "windowing"):
            s = m["smallest"].get(row)
            print(f"- smallest limit {row_label(row)} ran at: " + (
                f"{mb(s['limit'])} MB ({s['limit_label'].replace('windowing', 'flash')}), {s['decode_tok_s']:.2f} "
                f"decode tok/s" if s
                else "none of these"))


def limit_cell(label: str, limit: Optional[int], gguf_bytes: int) -> str:
    """'147.5 (1.50x)', or for a row's smallest limit '255.9 (2.60x, flash min)'."""
    if limit is None:
        return "none"
    kind = "" if label.endswith("x") else ", " + label.replace("windowing", "flash")
    return f"{limit / 1e6:.1f} ({limit / gguf_bytes:.2f}x{kind})"


def side_by_side(m: dict) -> str:
    """One line per limit: decode tokens/s and disk MB per token of llama.cpp, naive and flash ('-': does not run)."""
    kinds = ("llama.cpp", "naive", "windowing")
    head = ["limit MB (x GGUF)"] + [f"{row_label(r)} tok/s" for r in kinds] + [f"{row_label(r)} disk MB/token"
                                                                               for r in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, limit in [("-", None), *m["limits"].items()]:
        got = [m["rows"].get(f"{r}@{label}") for r in kinds]
        tok = ["-" if not a or not a["fits"] else f"{a['decode_tok_s']:.2f}" for a in got]
        disk = ["-" if not a or not a["fits"] or a["disk_bytes_per_token"] is None else
                f"{a['disk_bytes_per_token'] / 1e6:.1f}" for a in got]
        if label == "-":  # no limit: our reference is dense
            dense = m["rows"].get("dense@-")
            tok[1:] = ["-", "dense: " + ("-" if not dense or not dense["fits"] else f"{dense['decode_tok_s']:.2f}")]
        where = limit_cell(label, limit, m["gguf_bytes"])
        lines.append("| " + " | ".join([where, *tok, *disk]) + " |")
    return "\n".join(lines)


def plot(result: dict, folder: Path):
    """ms per decode token against the total memory limit, one figure per model (the paper's Fig. 7 with the peer)."""
    from .cli import figure

    for m in result["models"]:
        with figure(folder / f"latency_vs_limit_{m['name']}.png", f"{m['name']}: latency against the memory limit",
                    "ms per decode token", "memory limit of the whole process (MB)") as ax:
            for row in ("llama.cpp", "naive", "windowing"):
                pts = [(limit / 1e6, 1000.0 / m["rows"][f"{row}@{label}"]["decode_tok_s"])
                       for label, limit in m["limits"].items()
                       if m["rows"].get(f"{row}@{label}", {}).get("fits")]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=row_label(row))
            ax.set_yscale("log")
