"""Same-budget mode: the paper's Table 3 end to end, every row given the same DRAM budget (synthetic model).

    python -m mlx_flash.bench --same-budget opt-6.7b [--layers 16] [--share 0.5] [--bits 4] [--tokens 4]
        [--settle 5] [--repeats 2] [--hit 0.91] [--waste 0.14] [--rows naive,hybrid,all,all+prefetch]
        [--cgroup] [--resident-layout in-out|out-in] [--json out.json] [--dir models/synthetic-e2e-opt-6.7b-q4-L16]

What is synthetic, and only that: the weights (random) and the activation sets. Everything
else is the product: the folder has the layout `convert` writes (flash.json, a quantized
resident.safetensors, ffn.bundles with CRCs), `load.load_resident` loads it into the OPT model
definition, and the rows are the runtime's own FFN providers, run by the benchmark's
`rows.run_all` on one model object, interleaved, with real compute (float32 activations, 4-bit
weights of group 64 like `convert --quantize 4`, the resident matrices in the layout convert
chooses for this machine's default device unless --resident-layout says otherwise):

| row          | FFN provider                                            | reads per token                  |
| naive        | baselines.MmapFFN (+ the ResidentFFN layers that fit)   | the other layers, cold mmap      |
| hybrid       | baselines.HybridFFN (the same resident layers)          | the other layers, direct reads   |
| all          | flash.ffn.FlashFFN, window 5, no coalescing             | neurons new to the window        |
| all+prefetch | FlashFFN + flash.prefetch (lookahead)                   | the same, read one layer ahead   |

The budget is `--share` of the model (resident weights + every bundle's content) and covers
everything each row holds: flash rows are planned by flash.budget.plan (resident, predictors,
KV cache, working memory, staging, windows); the baselines keep whole FFN layers resident only
while baselines.plan_baseline's total (the same resident part, one streamed layer's packed
arrays, staging or the pages it maps and their readahead, KV cache, working memory) stays
within it. `fits`: the plan is within the budget and so is the measured peak (MLX's peak plus,
for naive, the largest page-cache footprint of ffn.bundles seen). With --cgroup each row and
repetition runs in its own child process inside a memory cgroup whose limit is the budget plus
the child's baseline (bench.cgroup) plus --cgroup-slack (64 MiB: Python objects, thread stacks,
which no plan counts); the kernel decides what stays cached, and `fits` reads the cgroup's peak.

Predictors (`SyntheticPredictor`): per layer a rank-128 low-rank pair quantized to 8 bits, like
trained ones in memory, computed on the real FFN input every token (its cost is real, its
bytes are planned), but the neurons it reports active are those of bench.scale's
ActivationProcess (10% of the FFN predicted per token, 2.4% new to a window of 5: the paper's
figures), stepped once per forward pass. Lookahead (`SyntheticLookahead`, layer l's input ->
layer l+1's neurons): the same cost, and it names each neuron layer l+1 will need that is not
in its window with probability --hit, plus wrong ones, --waste of what it names (defaults:
the lookahead predictors measured on the built-in model, hit 0.91-0.95, waste 0.07-0.14).
The synthetic model and its predictors: mlx_flash.bench.synthetic. Figures per decode token are
medians over --repeats interleaved runs of --tokens tokens, after --settle untimed tokens in the
flash rows (the prompt is one window step, so the windows fill).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from ..errors import FlashError
from ..format import FlashConfig
from ..models.in_out import LAYOUTS, default_layout
from ..sizes import parse_budget, parse_size
from ..system import direct_read_method, eviction_method
from .scale import Geometry
from .synthetic import (GEOMETRIES, PREDICTOR_RANK, ActiveSets, SyntheticLookahead, SyntheticPredictor,
                        write_model)

ROWS = ("naive", "hybrid", "all", "all+prefetch")
DEFAULTS = {"tokens": 4, "settle": 5, "repeats": 2, "prompt": 4}
QUICK = {"tokens": 2, "settle": 3, "repeats": 1, "prompt": 2}
PAPER_CPU = {"naive": 3182.0, "all": 669.0}  # Table 3, OPT 6.7B on the M1 Max CPU, ms per token
TARGET_SPEEDUP = 3.0
TARGET_EXPOSED = 0.5


def flash_options(model, cfg: FlashConfig, args):
    """rows.Setup.flash_options: the synthetic predictors of a flash row (fresh sets per row, same seed)."""
    def options(row: str) -> dict:
        sets = ActiveSets(cfg.d_ff, cfg.n_layers, args.seed)
        rank = min(PREDICTOR_RANK, cfg.d_model // 8)
        preds = [SyntheticPredictor(l, sets, cfg.d_model, rank) for l in range(cfg.n_layers)]
        out = {"predictor": preds, "profile": False}
        if row == "all+prefetch":
            looks = [None] + [SyntheticLookahead(l, sets, cfg.d_model, rank, args.hit, args.waste, args.seed)
                              for l in range(1, cfg.n_layers)]
            for look, layer in zip(looks[1:], model.layers[1:]):
                look.window = lambda layer=layer: layer.mlp.cache  # its FlashFFN's, once attached
            out.update(prefetch=True, lookahead=looks)
        return out

    return options


# MARK: - measuring: every row at the same budget


def baseline_weights(s, budget: int):
    """The weights naive and hybrid may hold so that everything they plan stays within `budget` (the
    smaller of the two: both hold the same layers), and why they cannot run when that is too little."""
    from ..baselines import KINDS, plan_baseline
    from ..flash.attach import resident_facts

    facts = resident_facts(s.model, s.down_bias)
    plans = [plan_baseline(s.folder, s.cfg, facts, kind, 1 << 62, s.context) for kind in KINDS]
    weights = min(budget - (pl.fixed - pl.resident) for pl in plans)
    if weights >= facts[0]:
        return weights, None
    need = max(pl.fixed for pl in plans)
    return 2, (f"the baselines need {need / 1e6:.1f} MB with no FFN layer resident (resident weights, one streamed "
               f"layer, staging, KV cache, working memory), more than the budget's {budget / 1e6:.1f} MB")


def measure(args, folder: Path, cfg: FlashConfig, rows: List[str], cgroup: Optional[Path] = None) -> dict:
    """Load the synthetic model once and run every row on it (bench.rows.run_all); with `cgroup`, this
    is the child process inside it."""
    import gc

    from ..flash.budget import model_bytes
    from ..load import load_resident
    from .cgroup import measure_baseline
    from .rows import Setup, run_all

    mx.set_cache_limit(0)  # freed buffers go back to the OS: memory figures are what is live
    gc.collect()
    base = measure_baseline(cgroup, args.threads) if cgroup is not None else None
    mlx_baseline = mx.get_active_memory()
    model, down_bias = load_resident(folder, cfg)
    n = args.prompt_tokens + args.settle + args.tokens + 1
    ids = np.random.default_rng(args.seed).integers(0, cfg.model_config["vocab_size"], n)
    s = Setup(folder, cfg, model, down_bias, ids, args.prompt_tokens, args.tokens, threads=args.threads,
              verify=False, evict=cgroup is None, mlx_baseline=mlx_baseline,
              flash_options=flash_options(model, cfg, args), settle_tokens=args.settle)
    if cgroup is not None:
        s.cgroup, s.baseline, s.slack = cgroup, base["cgroup"], args.cgroup_slack
    budget = parse_budget(args.share, model_bytes(folder, cfg))
    weights, why = baseline_weights(s, budget)
    res = run_all(s, rows, {args.share: budget}, args.repeats, 0, 0, candidates=(0,), progress=not args.quiet,
                  base_budgets={args.share: weights})
    for row in ("naive", "hybrid"):
        for r in res["runs"].get(f"{row}@{args.share}", []) if why else []:
            r["reason"] = why
    res.update(budget=budget, baseline_weights=weights if why is None else 0, model_bytes=model_bytes(folder, cfg), cgroup=base)
    return res


def summarize(res: dict, stride: int, slack: int = 0) -> Dict[str, dict]:
    """Per row (`naive@0.5`, ...): medians per decode token (ms_total over every timed token of every
    repetition; the phases over repetitions) and whether it fits."""
    from .report import aggregate

    budget, out = res["budget"], {}
    for k, runs in res["runs"].items():
        a = aggregate(runs, None, None)
        row = k.split("@")[0]
        if not a["fits"]:
            out[k] = {"row": row, "budget": budget, "fits": False, "reason": a["reason"]}
            continue
        st = [r["stats"] for r in runs]
        med = lambda name, st=st: float(np.median([x[name] for x in st])) if st[0].get(name) is not None else None
        flash = row.startswith("all")
        peak, cg = a["peak_bytes"], a.get("peak_cgroup_bytes")
        r = {"row": row, "budget": budget, "planned_bytes": a["plan"]["total"],
             "weights_held_bytes": a["resident_bytes"], "plan": a["plan"],
             "ms_total": float(np.median([t for x in runs for t in x["ms_tokens"]])),
             "ms_io": a["ms_io"], "ms_io_exposed": med("ms_io_exposed") if flash else a["ms_io"],
             "ms_mem": a["ms_memory"], "ms_compute": med("ms_compute"),
             "bytes_read_per_token": a["bytes_read_per_token"], "bundles_per_token": a["bundles_per_token"],
             "disk_bytes_per_token": a["disk_bytes_per_token"], "stride": stride,
             "peak_bytes": peak, "peak_mlx_bytes": a["peak_mlx_bytes"],
             "peak_page_cache_bytes": a["peak_page_cache_bytes"], "peak_cgroup_bytes": a.get("peak_cgroup_bytes"),
             "cgroup_failcnt": max((x.get("cgroup_failcnt", 0) for x in runs), default=0),
             "ms_per_token_runs": a["ms_per_token_runs"], "repeats": a["repeats"]}
        r["ms_other"] = r["ms_total"] - r["ms_io_exposed"] - r["ms_mem"] - r["ms_compute"]
        if flash:
            r.update(needed_per_token=a["new_bundles_per_token"], window_shrinks=a["window_shrinks"],
                     ffn_share_resident=a["ffn_share_resident"], prefetch_hit_rate=med("prefetch_hit_rate"),
                     prefetched_per_token=med("prefetched_per_token"),
                     prefetch_wasted_per_token=med("prefetch_wasted_per_token"))
        # the plan within the budget, and the measured peak: MLX's + naive's page cache, or in a cgroup
        # everything the process was charged beyond its baseline (the kernel decides the page cache there)
        r["fits"] = r["planned_bytes"] <= budget and (peak <= budget if cg is None else cg <= budget + slack)
        out[k] = r
    naive = next((a for a in out.values() if a["row"] == "naive" and a["fits"]), None)
    for a in out.values():
        if naive and a["fits"]:
            a["speedup_vs_naive"] = naive["ms_total"] / a["ms_total"]
    return out


def targets(summary: Dict[str, dict], label: str) -> List[str]:
    naive, flash, plain = (summary.get(f"{r}@{label}") for r in ("naive", "all+prefetch", "all"))
    ok = lambda a: a is not None and a["fits"]
    met = lambda c: "met" if c else "MISSED"
    out = []
    if ok(naive) and ok(flash):
        x = naive["ms_total"] / flash["ms_total"]
        out.append(f"ms/token, naive / all+prefetch at the same budget: {x:.2f}x (target >= {TARGET_SPEEDUP:.0f}x: "
                   f"{met(x >= TARGET_SPEEDUP)}; the paper's CPU: {PAPER_CPU['naive'] / PAPER_CPU['all']:.1f}x)")
    if ok(flash):
        e = flash["ms_io_exposed"] / flash["ms_io"] if flash["ms_io"] else 0.0
        out.append(f"exposed I/O, all+prefetch: {flash['ms_io_exposed']:.1f} of {flash['ms_io']:.1f} ms "
                   f"({e:.0%}; target <= {TARGET_EXPOSED:.0%}: {met(e <= TARGET_EXPOSED)}); prefetch hit rate "
                   f"{flash['prefetch_hit_rate'] or 0:.2f}")
    if ok(flash) and ok(plain):
        out.append(f"ms/token with prefetch / without: {flash['ms_total']:.1f} / {plain['ms_total']:.1f} "
                   f"(target lower: {met(flash['ms_total'] < plain['ms_total'])})")
    return out


def print_report(out: dict, g: Geometry, cfg: FlashConfig):
    label, gb = out["share"], lambda v: "-" if v is None else f"{v / 1e9:.3f}"
    budget = out["budget"]
    print(f"# mlx-flash same-budget mode: SYNTHETIC {g.name} geometry, {cfg.n_layers} layers, random weights "
          f"({out['folder']})")
    print(f"d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.quantization['bits']}-bit weights (group "
          f"{cfg.quantization['group_size']}), float32 activations; model {out['model_bytes'] / 1e9:.3f} GB "
          f"(resident part + bundle contents); every row's budget: {label} of it = {budget / 1e9:.3f} GB, "
          f"everything counted; baselines hold {out['baseline_weights'] / 1e9:.3f} GB of weights")
    e = cfg.predictors["process"]
    print(f"activation sets: SYNTHETIC (bench.scale.ActivationProcess: {e['predicted_share']:.1%} predicted, "
          f"{e['new_share']:.2%} new to a window of 5 per token); predictors: rank {PREDICTOR_RANK}, 8-bit, computed; "
          f"lookahead: hit {out['hit']}, waste {out['waste']} (synthetic, set by --hit/--waste)")
    print(f"resident matrices (attention, the tied LM head): stored {out['resident_layout']}, as `convert --quantize "
          f"{cfg.quantization['bits']} --resident-layout {out['resident_layout']}` writes them (models/in_out.py)")
    print(f"{out['tokens']} tokens x {out['repeats']} interleaved repeats per row (+{out['settle']} untimed in flash "
          f"rows), medians; reads: {direct_read_method()} (flash, hybrid), naive: "
          + ("memory cgroup per child, the kernel evicts" if out["cgroup"] else f"{eviction_method()} every layer")
          + (f"; load average {out['load_average']}" if out.get("load_average") else ""))
    head = ["row (synthetic)", "budget GB", "planned GB", "weights held GB", "MB read/token", "I/O ms", "exposed I/O ms",
            "memory ms", "compute ms", "total ms/token", "vs naive", "prefetch hit", "wasted/token", "peak GB", "cgroup peak GB", "fits"]
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for k, a in out["summary"].items():
        if not a["fits"] and "ms_total" not in a:
            print(f"| {k} | {gb(budget)} | does not fit: {a['reason']} |")
            continue
        hit = a.get("prefetch_hit_rate")
        cells = [k, gb(budget), gb(a["planned_bytes"]), gb(a["weights_held_bytes"]),
                 f"{a['bytes_read_per_token'] / 1e6:.1f}", f"{a['ms_io']:.1f}", f"{a['ms_io_exposed']:.1f}",
                 f"{a['ms_mem']:.1f}", f"{a['ms_compute']:.1f}", f"{a['ms_total']:.1f}",
                 f"{a['speedup_vs_naive']:.2f}x" if a.get("speedup_vs_naive") else "-",
                 "-" if hit is None else f"{hit:.2f}",
                 "-" if hit is None else f"{a['prefetch_wasted_per_token']:.0f}", gb(a["peak_bytes"]), gb(a["peak_cgroup_bytes"]),
                 "yes" if a["fits"] else "NO"]
        print("| " + " | ".join(cells) + " |")
    print(f"paper, Table 3 (OPT 6.7B fp16, M1 Max CPU): naive {PAPER_CPU['naive']:.0f} ms/token, flash "
          f"{PAPER_CPU['all']:.0f} ms/token")
    print("peak: MLX's peak + naive's largest page-cache footprint of ffn.bundles; fits: planned total and "
          + (f"cgroup peak (everything charged beyond the child's baseline) within budget + "
             f"{out['cgroup_slack'] >> 20} MiB, the limit (one child process per row and repeat)" if out["cgroup"]
             else "peak within the budget"))
    print("exposed I/O: what the token waited for (all of the I/O but in all+prefetch)")
    for t in out["targets"]:
        print(f"- {t}")


# MARK: - the command


def setup_arg_parser():
    p = argparse.ArgumentParser(prog="python -m mlx_flash.bench --same-budget",
                                description="Naive mmap, hybrid and flash at the same DRAM budget, end to end, on a "
                                            "synthetic quantized OPT (see mlx_flash.bench.same_budget).")
    p.add_argument("--same-budget", required=True, help=f"geometry: {', '.join(GEOMETRIES)}")
    p.add_argument("--layers", type=int, default=None, help="layers of the synthetic model (default: the geometry's)")
    p.add_argument("--share", default="0.5", help="every row's DRAM budget: a share of the model (0.5) or bytes")
    p.add_argument("--bits", type=int, default=4, help="weight bits, resident part and bundles (default 4)")
    p.add_argument("--group", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--tokens", type=int, default=None, help=f"timed decode tokens per run ({DEFAULTS['tokens']})")
    p.add_argument("--settle", type=int, default=None, help=f"untimed decode tokens first, flash rows ({DEFAULTS['settle']})")
    p.add_argument("--repeats", "-r", type=int, default=None, help=f"interleaved runs per row ({DEFAULTS['repeats']})")
    p.add_argument("--prompt-tokens", type=int, default=None, help=f"prompt tokens ({DEFAULTS['prompt']})")
    p.add_argument("--hit", type=float, default=0.91, help="lookahead: share of the needed new neurons it names")
    p.add_argument("--waste", type=float, default=0.14, help="lookahead: share of what it names that is not needed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resident-layout", choices=LAYOUTS, default=None,
                   help="how the resident matrices are stored, as convert's option (default: what convert chooses "
                        "on this machine's default device)")
    p.add_argument("--threads", type=int, default=32, help="read threads (flash, hybrid)")
    p.add_argument("--dir", default=None, help="the synthetic model's folder (default models/synthetic-e2e-...)")
    p.add_argument("--cgroup", action="store_true", help="run the rows in a child process inside a memory cgroup")
    p.add_argument("--cgroup-slack", type=parse_size, default=64 << 20,
                   help="bytes over budget + baseline in the limit: Python objects (the windows' bookkeeping, the "
                        "activation process), thread stacks, malloc arenas, which no plan counts (default 64 MiB)")
    p.add_argument("--json", default=None, help="write the summary and every run to this file")
    p.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cgroup-child", default=None, help=argparse.SUPPRESS)
    return p


def check_args(args) -> List[str]:
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        name = "prompt_tokens" if k == "prompt" else k
        if getattr(args, name) is None:
            setattr(args, name, v)
    if args.same_budget not in GEOMETRIES:
        raise FlashError(f"--same-budget {args.same_budget}: unknown geometry (choose from {', '.join(GEOMETRIES)})")
    g = GEOMETRIES[args.same_budget]
    args.layers = args.layers or g.n_layers
    if not 1 <= args.layers <= g.n_layers:
        raise FlashError(f"--layers must be between 1 and {g.n_layers}")
    if args.bits not in (2, 3, 4, 6, 8):
        raise FlashError("--bits must be one of 2, 3, 4, 6, 8")
    if min(args.repeats, args.prompt_tokens, args.threads) < 1 or args.tokens < 2 or args.settle < 0:
        raise FlashError("--tokens must be at least 2 (the warm-up decodes 2), --repeats, --prompt-tokens and "
                         "--threads at least 1, --settle at least 0")
    if not (0 <= args.hit <= 1 and 0 <= args.waste < 1):
        raise FlashError("--hit must be within [0, 1] and --waste within [0, 1)")
    try:
        if parse_budget(args.share, 1 << 40) <= 0:
            raise FlashError("")
    except FlashError:
        raise FlashError(f"--share '{args.share}' is not a share of the model (0.6, 60%) or a size (1.2G)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise FlashError(f"--rows: unknown row {', '.join(bad) or '(none)'} (choose from {', '.join(ROWS)})")
    return [r for r in ROWS if r in rows]


def run(argv) -> dict:
    """`python -m mlx_flash.bench --same-budget ...` (errors are reported by the bench command's wrapper)."""
    import os
    import tempfile

    from ..sources import models_dir
    from .cgroup import cgroup_root, make_cgroup, spawn

    args = setup_arg_parser().parse_args(argv)
    rows = check_args(args)
    g = GEOMETRIES[args.same_budget]
    layout = args.resident_layout or default_layout()
    folder = Path(args.dir) if args.dir else models_dir() / f"synthetic-e2e-{g.name}-q{args.bits}-L{args.layers}"
    if args.cgroup_child:  # inside the cgroup: the folder is written, the parent reads our JSON
        res = measure(args, folder, FlashConfig.load(folder), rows, Path(args.cgroup_child))
        Path(args.json).write_text(json.dumps(res))
        return res
    if args.cgroup:
        cgroup_root()  # a clear message where there is none
    t0 = time.time()
    cfg = write_model(folder, g, args.layers, args.bits, args.group, args.seed, progress=not args.quiet,
                      resident_layout=layout)
    if args.cgroup:  # one child per row and repetition (memory a row leaves behind is not the next one's)
        child = [a for a in argv if a not in ("--cgroup", "--json") and a != args.json]
        res = None
        for _ in range(args.repeats):
            for row in rows:
                cg, out = make_cgroup(), Path(tempfile.mkdtemp(prefix="mlx-flash-e2e-")) / "child.json"
                r = spawn(cg, out, child + ["--dir", str(folder), "--json", str(out), "--cgroup-child", str(cg),
                                            "--rows", row, "--repeats", "1"], [row])
                if res is None:
                    res = {**r, "cgroup": []}
                else:
                    for k, v in r["runs"].items():
                        res["runs"].setdefault(k, []).extend(v)
                res["cgroup"].append({"row": row, **r["cgroup"]})
    else:
        res = measure(args, folder, cfg, rows)
    summary = summarize(res, cfg.layout.stride, args.cgroup_slack)
    out = {"synthetic": True, "what_is_synthetic": "the weights (random) and the activation sets (ActivationProcess)",
           "geometry": g.name, "layers": cfg.n_layers, "bits": args.bits, "group_size": args.group,
           "folder": str(folder), "model_bytes": res["model_bytes"], "share": args.share, "budget": res["budget"],
           "baseline_weights": res["baseline_weights"], "rows": rows, "tokens": args.tokens, "settle": args.settle,
           "repeats": args.repeats, "prompt_tokens": args.prompt_tokens, "threads": args.threads, "hit": args.hit,
           "waste": args.waste, "resident_layout": layout, "cgroup": res["cgroup"] if args.cgroup else None, "cgroup_slack": args.cgroup_slack,
           "load_average": round(os.getloadavg()[0], 1), "summary": summary,
           "targets": targets(summary, args.share), "runs": res["runs"], "seconds": time.time() - t0}
    print_report(out, g, cfg)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out
