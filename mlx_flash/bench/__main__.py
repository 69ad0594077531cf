"""python -m mlx_flash.bench: the paper's Tables 2 and 3 (and Figures 1 and 7) on one model, in one process.

    python -m mlx_flash.bench --model models/smollm2-135m [--dram-budget 0.5|min|60M] [--prompt-tokens 128]
        [--gen-tokens 256] [--repeats 3] [--rows dense,naive,hybrid,predictor,windowing,all]
        [--json out.json] [--plots DIR] [--quick] [--cgroup] [--sweep 0.35:0.8:0.05]
    python -m mlx_flash.bench --scale opt-6.7b [--layers 32] [--tokens 32] ...   (see mlx_flash.bench.scale)
    python -m mlx_flash.bench --same-budget opt-6.7b [--layers 16] [--share 0.5] [--cgroup] ...
        (Table 3 end to end, every row at the same budget, synthetic: see mlx_flash.bench.same_budget)
    python -m mlx_flash.bench --calibration opt-6.7b   (calibration's seconds per layer at that geometry)
    python -m mlx_flash.bench --prompts opt-6.7b --layers 16 --share 0.6   (time to first token, same budget)
    python -m mlx_flash.bench --chat [--model smollm2-135m]   (a chat's turns against the server, kept cache or not)
    python -m mlx_flash.bench --peer [--models smollm2-135m,llama-1b-L4] [--limits 0.5,1,2]
        (llama.cpp beside dense, naive and flash at the same memory limit: see mlx_flash.bench.peer)

The rows and how they are run: mlx_flash.bench.rows. --baseline-share is the weights
naive and hybrid hold (default: the budget when it is a share of the model, else 0.5).
Cold pages, two ways (DESIGN.md, "Measuring honestly"):
- default: the naive row evicts each layer's pages after use and the whole file after
  the last layer (system.eviction_method(): madvise + posix_fadvise DONTNEED on Linux,
  msync(MS_INVALIDATE) on macOS), and checks with mincore that they went: the report
  says whether that was verified;
- --cgroup: every row but dense runs inside a memory cgroup (mlx_flash.bench.cgroup).
Flash rows and hybrid read with direct I/O (O_DIRECT on Linux, F_NOCACHE on macOS).
The bytes the process read from storage (/proc/self/io; macOS: proc_pid_rusage) stand
beside the bytes each row asked for.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import List

from ..errors import FlashError, cli
from ..flash.budget import model_bytes
from ..prepare import model_for
from ..sizes import parse_size
from ..system import direct_read_method, eviction_method, rss_bytes
from . import calibration, chat, peer, prompts, same_budget, scale
from .cgroup import cgroup_root, child_main, run_in_cgroup
from .cli import add_common_arguments, write_outputs
from .probe import SCRATCH_SIZE
from .report import add_probe, cold_pages, plot_rows, print_report, summarize, targets
from .rows import GAP_CANDIDATES, QUICK, ROWS, baseline_budgets, load_setup, resolve_budgets, run_all

DEFAULT_BUDGET = "0.5"
DEFAULT_PROMPT = 128
DEFAULT_GEN = 256
DEFAULT_REPEATS = 3
PROBE_BYTES = 64 << 20


def parse_ints(text: str) -> List[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise FlashError(f"'{text}' is not a list of integers")


def setup_arg_parser():
    p = argparse.ArgumentParser(prog="python -m mlx_flash.bench",
                                description="Benchmark dense, naive mmap, hybrid and flash rows on one model "
                                            "(the paper's Tables 2-3, Figures 1 and 7).")
    p.add_argument("--model", "-M", default=None, help="converted flash model folder with trained predictors, or a "
                                                          "built-in name (converted and calibrated on first use)")
    p.add_argument("--dram-budget", "-b", default=DEFAULT_BUDGET,
                   help="fraction of the model (0.5), bytes (60M), or 'min': the smallest flash fits")
    p.add_argument("--baseline-share", default=None,
                   help="weights naive and hybrid keep in memory: a share of the model or bytes (default: the "
                        "budget when it is a share, else 0.5)")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT)
    p.add_argument("--gen-tokens", "-n", type=int, default=DEFAULT_GEN)
    p.add_argument("--repeats", "-r", type=int, default=DEFAULT_REPEATS)
    add_common_arguments(p, ROWS, PROBE_BYTES)
    p.add_argument("--cgroup", action="store_true",
                   help="run the rows (dense excepted) inside a memory cgroup limited to budget + baseline")
    p.add_argument("--sweep", default=None, help="budgets lo:hi:step (fractions): latency against memory (Fig. 7)")
    p.add_argument("--window", type=int, default=None, help="window of the windowing rows (default: calibrated)")
    p.add_argument("--recall", type=float, default=None, help="predictor recall level (default: calibrated)")
    p.add_argument("--gap-candidates", default=",".join(map(str, GAP_CANDIDATES)))
    p.add_argument("--gap-tokens", type=int, default=8, help="decode tokens per gap calibration run")
    p.add_argument("--verify", action="store_true", help="check every bundle's CRC while reading (off: the "
                                                         "paper's reads have none)")
    p.add_argument("--probe-file", default=None, help="file the probe reads (default: ffn.bundles when at least "
                                                      "256 MB, else a scratch file written once in the model folder)")
    p.add_argument("--scale", default=None, help="synthetic model at real size, e.g. opt-6.7b: its own flags, "
                                                 "see python -m mlx_flash.bench --scale opt-6.7b --help")
    p.add_argument("--same-budget", default=None, help="naive, hybrid and flash end to end at one budget on a synthetic "
                                                       "model, e.g. opt-6.7b: python -m mlx_flash.bench --same-budget "
                                                       "opt-6.7b --help")
    p.add_argument("--cgroup-slack", type=parse_size, default=8 << 20,
                   help="--cgroup: added to the limit for the run's own thread stacks and Python objects (default 8M)")
    # internal: the cgroup child
    p.add_argument("--cgroup-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-budgets", default=None, help=argparse.SUPPRESS)
    return p


def apply_quick(args, argv):
    """--quick: small defaults for what was not given explicitly."""
    given = {a.split("=")[0] for a in (argv or sys.argv[1:]) if a.startswith("-")}
    flags = {"prompt_tokens": "--prompt-tokens", "gen_tokens": "--gen-tokens", "repeats": "--repeats",
             "gap_candidates": "--gap-candidates", "gap_tokens": "--gap-tokens", "probe_bytes": "--probe-bytes"}
    short = {"gen_tokens": "-n", "repeats": "-r"}
    for k, v in QUICK.items():
        if flags[k] not in given and short.get(k) not in given:
            setattr(args, k, v)


@cli
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--scale" or a.startswith("--scale=") for a in argv):
        return scale.run(argv)
    if any(a == "--same-budget" or a.startswith("--same-budget=") for a in argv):
        return same_budget.run(argv)
    if any(a == "--calibration" or a.startswith("--calibration=") for a in argv):
        return calibration.run(argv)
    if any(a == "--prompts" or a.startswith("--prompts=") for a in argv):
        return prompts.run(argv)
    if "--chat" in argv:
        return chat.run(argv)
    if "--peer" in argv:
        return peer.run(argv)
    args = setup_arg_parser().parse_args(argv)
    if args.quick:
        apply_quick(args, argv)
    if args.model is None:
        raise FlashError("--model is required (or --scale for the synthetic model)")
    args.model = model_for(args.model)  # a built-in name: its converted, calibrated copy
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise FlashError(f"--rows: unknown row {', '.join(bad) or '(none)'} (choose from {', '.join(ROWS)})")
    rows = [r for r in ROWS if r in rows]  # the table's order
    if args.repeats < 1:
        raise FlashError("--repeats must be at least 1")
    if args.coalesce_gap != "auto":
        args.coalesce_gap = parse_ints(args.coalesce_gap)[0]
    candidates = tuple(parse_ints(args.gap_candidates))
    if args.cgroup_child:
        return child_main(args, rows, candidates)
    if args.cgroup and not Path("/sys/fs/cgroup/memory").is_dir():
        cgroup_root()  # raises the clear message

    s = load_setup(args.model, args.prompt_tokens, args.gen_tokens, threads=args.threads, verify=args.verify,
                   window=args.window, recall=args.recall)
    baseline_rss = rss_bytes()  # after loading the resident weights (the cgroup child measures before)
    budgets = resolve_budgets(s, args.dram_budget, args.sweep)
    base = baseline_budgets(s, budgets, args.baseline_share)
    t_start = time.time()
    if args.cgroup:
        local_rows = [r for r in rows if r == "dense"]
        res = run_all(s, local_rows, budgets, args.repeats, 0, 0, progress=not args.quiet) if local_rows else \
            {"runs": {}, "coalescing": {}}
        child = run_in_cgroup(args, [r for r in rows if r != "dense"], budgets, base)
        res["runs"].update(child["runs"])
        res["coalescing"] = child["coalescing"]
        res["cgroup"] = child["cgroup"]
    else:
        res = run_all(s, rows, budgets, args.repeats, args.coalesce_gap, args.gap_tokens, candidates,
                      progress=not args.quiet, base_budgets=base)
    summary = summarize(res["runs"], budgets, rows, base)
    probe = None
    if not args.no_probe:
        probe = add_probe(summary, s.folder, args.threads, parse_size(args.probe_bytes),
                          0 if args.quick else SCRATCH_SIZE, progress=not args.quiet,
                          path=args.probe_file and Path(args.probe_file))
    result = {"model": str(s.folder), "model_bytes": model_bytes(s.folder, s.cfg), "budgets": budgets,
              "baseline_budgets": base, "rows": rows, "prompt_tokens": s.prompt_tokens, "gen_tokens": s.gen_tokens,
              "repeats": args.repeats, "threads": args.threads, "verify": args.verify,
              "eviction": cold_pages(summary, eviction_method(), args.cgroup), "direct_reads": direct_read_method(),
              "cgroup": res.get("cgroup"), "baseline_rss_bytes": baseline_rss, "coalescing": res.get("coalescing") or {},
              "probe": probe, "summary": summary, "runs": res["runs"], "seconds": time.time() - t_start,
              "targets": {l: targets(summary, l) for l in budgets}}
    print_report(result, s.cfg)
    write_outputs(result, args.json, args.plots,
                  lambda d: plot_rows(summary, budgets, result["model_bytes"], s.folder.name, d))
    return result


if __name__ == "__main__":
    main()
