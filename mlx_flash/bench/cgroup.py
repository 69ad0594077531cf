"""--cgroup: the rows run in a child process inside a memory cgroup (v1) whose limit is the budget.

The limit is the row's memory (flash: the budget; naive and hybrid: what they were
planned to hold) plus the child's own baseline (its cgroup usage after importing its
libraries and loading the tokenizer, before any weight) plus --cgroup-slack; the
kernel then decides what stays cached. If the cgroup cannot be created the command stops.
"""

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from ..errors import FlashError
from ..system import rss_bytes
from .rows import load_setup, run_all


def cgroup_root() -> Path:
    """This process's own memory cgroup (v1), where a child cgroup can be made."""
    base = Path("/sys/fs/cgroup/memory")
    if not base.is_dir():
        raise FlashError("--cgroup needs cgroup v1's memory controller at /sys/fs/cgroup/memory, which is "
                         "absent here: run without --cgroup (pages are then evicted after every layer)")
    rel = "/"
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if "memory" in parts[1].split(","):
                rel = parts[2]
    except OSError:
        pass
    root = base / rel.lstrip("/")
    return root if root.is_dir() else base


def make_cgroup() -> Path:
    path = cgroup_root() / f"mlx-flash-bench-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.swappiness").write_text("0")
    except OSError as e:
        raise FlashError(f"--cgroup: cannot create the memory cgroup {path} ({e.strerror}); it needs root and a "
                         f"writable cgroup v1 hierarchy: run as root, or without --cgroup")
    return path


def measure_baseline(cg: Path, threads: int) -> Dict[str, int]:
    """The child's cgroup usage and RSS once its libraries are imported and its read threads have run,
    before any weight: what the limit adds to the budget."""
    from concurrent.futures import ThreadPoolExecutor

    import mlx_lm.models.cache  # noqa: F401  what the rows import lazily
    import tqdm  # noqa: F401

    with ThreadPoolExecutor(threads) as pool:  # the threads' libc and Python machinery, once
        list(pool.map(time.sleep, [0.001] * threads))
    gc.collect()
    return {"cgroup": int((cg / "memory.usage_in_bytes").read_text()), "rss": rss_bytes()}


def child_main(args, rows: List[str], candidates):
    """Inside the cgroup (joined by _CHILD before any import): the baseline after the libraries and
    the tokenizer, before any weight; then the rows, each under limit = budget + baseline."""
    cg = Path(args.cgroup_child)
    measured = {}
    s = load_setup(args.model, args.prompt_tokens, args.gen_tokens,
                   before_weights=lambda: measured.update(measure_baseline(cg, args.threads)), threads=args.threads,
                   verify=args.verify, evict=False, window=args.window, recall=args.recall)
    s.cgroup, s.baseline, s.slack = cg, measured["cgroup"], args.cgroup_slack
    budgets, base = json.loads(args.child_budgets)
    res = run_all(s, rows, budgets, args.repeats, args.coalesce_gap, args.gap_tokens,
                  candidates=candidates, progress=False, base_budgets=base)
    res["cgroup"] = {"path": str(cg), "baseline_bytes": measured["cgroup"], "baseline_rss_bytes": measured["rss"],
                     "slack_bytes": args.cgroup_slack}
    Path(args.json).write_text(json.dumps(res))

# the child joins the cgroup first, so that everything it allocates is charged there
_CHILD = """
import os, sys
open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))
import mlx_flash.bench
mlx_flash.bench.main(sys.argv[2:])
"""


def run_in_cgroup(args, rows: List[str], budgets: Dict[str, int], base: Dict[str, int]) -> dict:
    cg = make_cgroup()
    out = Path(tempfile.mkdtemp(prefix="mlx-flash-bench-")) / "child.json"
    argv = ["--model", str(args.model), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens",
            str(args.gen_tokens), "--repeats", str(args.repeats), "--rows", ",".join(rows), "--threads",
            str(args.threads), "--coalesce-gap", str(args.coalesce_gap), "--gap-tokens", str(args.gap_tokens),
            "--gap-candidates", args.gap_candidates, "--json", str(out), "--cgroup-child", str(cg),
            "--child-budgets", json.dumps([budgets, base]), "--cgroup-slack", str(args.cgroup_slack)]
    argv += ["--verify"] if args.verify else []
    argv += ["--window", str(args.window)] if args.window else []
    argv += ["--recall", str(args.recall)] if args.recall else []
    return spawn(cg, out, argv, rows)


def spawn(cg: Path, out: Path, argv: List[str], rows: List[str]) -> dict:
    """Run `python -m mlx_flash.bench argv` as a child that joins cgroup `cg` first; it writes `out`.
    The cgroup is removed afterwards."""
    try:
        print(f"running {', '.join(rows)} in a child process inside memory cgroup {cg} ...", file=sys.stderr)
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # no 64 MB malloc arena per read thread
        p = subprocess.run([sys.executable, "-c", _CHILD, str(cg), *argv], env=env)
        if p.returncode != 0:
            oom = (cg / "memory.oom_control").read_text().replace("\n", ", ") if (cg / "memory.oom_control").exists() else ""
            raise FlashError(f"the benchmark's child process inside the memory cgroup failed (exit status "
                             f"{p.returncode}{', killed' if p.returncode < 0 else ''}; {oom.strip(', ')}): a row "
                             f"needed more memory than the budget, or see the error above")
        return json.loads(out.read_text())
    finally:
        try:
            cg.rmdir()
        except OSError:
            pass
