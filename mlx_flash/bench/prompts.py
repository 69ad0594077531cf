"""Time to first token at the same budget (synthetic), the prompt's side of the same-budget table:

    python -m mlx_flash.bench --prompts opt-6.7b [--layers 16] [--share 0.6] [--lengths 128,512,2048]
        [--rows dense,naive,window,pass] [--repeats 1] [--json out.json] [--quick]
(A chat's turns against the server, with and without the kept conversation cache: bench.chat.)

The synthetic model of same-budget mode (bench.synthetic: OPT geometry, 4-bit, random weights, the
product's loader and FFN providers) and its predictors, which now name the ActivationProcess's set for
each of a prompt's tokens (10% of the FFN predicted, 2.4% new per token, as in decode). Rows, each at
the same budget and the same prompt chunk (the one flash's plan chooses for this budget and context):

| row    | FFN provider                         | a prompt's FFN reads                                  |
| dense  | every bundle in memory (no budget)   | nothing: the prompt's compute alone                   |
| naive  | baselines.MmapFFN                    | the layers it does not hold, cold mmap, every chunk   |
| window | FlashFFN, prompt_mode "window"       | window steps: each group's new neurons, random reads  |
| pass   | FlashFFN, prompt_mode "pass"         | every bundle once per chunk, sequential slices        |

Time to first token: as generate runs a prompt (flash.prefill: all but the last token in chunks,
their matmuls in numpy on MLX's CPU backend, then the last token's logits), from a fresh KV cache,
pages of ffn.bundles dropped first. The floor: one sequential read of
every layer's FFN at the rate the in-run probe measures at the pass's read size and threads, plus the
prompt's compute (the dense row).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np

from ..errors import FlashError
from ..flash.bundle_reader import MAX_CHUNK
from ..flash.prefill import prefill
from ..format import BUNDLES_FILE, FlashConfig
from ..sizes import parse_budget
from ..system import direct_read_method, disk_read_bytes, drop_cache
from .same_budget import flash_options
from .synthetic import GEOMETRIES, write_model

ROWS = ("dense", "naive", "window", "pass")
LENGTHS = (128, 512, 2048)
TARGET_FLOOR = 1.5  # pass within 1.5x of (one sequential read + compute)
TARGET_VS_WINDOW = 5.0


def time_to_first_token(s, row: str, budget: int, length: int, chunk: int) -> dict:
    """One prompt of `length` tokens through one row; its seconds and what they were spent on."""
    from mlx_lm.models.cache import make_prompt_cache

    from .rows import attach_row, clear

    try:
        r = attach_row(s, "all" if row in ("window", "pass") else row, budget)
    except FlashError as e:
        clear(s)
        return {"row": row, "fits": False, "reason": str(e)}
    try:
        for layer in s.model.layers:
            if row in ("window", "pass"):
                layer.mlp.prompt_mode = row
        drop_cache(s.folder / BUNDLES_FILE)  # cold: what naive maps comes from the disk
        r.stats.reset()
        mx.reset_peak_memory()
        disk0 = disk_read_bytes()
        cache = make_prompt_cache(s.model)
        ids = [int(i) for i in s.ids[:length]]
        t0 = time.perf_counter()
        prefill(s.model, cache, ids[:-1], chunk)  # as generate does: all but the last token, logits not computed
        mx.eval(s.model(mx.array(ids[-1:])[None], cache=cache)[0, -1])
        ttft = time.perf_counter() - t0
        snap = r.stats.snapshot()
        out = {"row": row, "fits": True, "length": length, "chunk": chunk, "ttft_s": ttft,
               "disk_bytes": disk_read_bytes() - disk0 if disk0 >= 0 else None,
               "peak_mlx_bytes": mx.get_peak_memory() - s.mlx_baseline, "plan": r.plan}
        if row in ("window", "pass"):
            out.update(io_s=snap["prompt_ms_io"] / 1e3, io_exposed_s=(snap["prompt_ms_io_exposed"] if row == "pass"
                                                                      else snap["prompt_ms_io"]) / 1e3,
                       memory_s=snap["prompt_ms_memory"] / 1e3, bytes_read=snap["prompt_bytes_read"],
                       mode=snap["prompt_mode"], passes=snap["prompt_passes"], steps=snap["prompt_window_steps"])
            out["compute_s"] = ttft - out["io_exposed_s"] - out["memory_s"]
        return out
    finally:
        r.close()
        clear(s)


def probe_rate(folder: Path, threads: int, nbytes: int) -> float:
    """GB/s of direct reads at the pass's read size (the reader's chunk) and threads, measured now."""
    from .probe import probe_at, probe_disk

    probe = probe_disk(folder / BUNDLES_FILE, [MAX_CHUNK], [threads], nbytes, progress=False)
    return probe_at(probe, MAX_CHUNK, threads)


def measure(args, folder: Path, cfg: FlashConfig, rows: List[str], lengths: List[int]) -> dict:
    import gc

    from ..flash.budget import model_bytes
    from ..load import load_resident
    from .rows import Setup, attach_row, clear
    from .same_budget import baseline_weights

    mx.set_cache_limit(0)
    gc.collect()
    mlx_baseline = mx.get_active_memory()
    model, down_bias = load_resident(folder, cfg)
    ids = np.random.default_rng(args.seed).integers(0, cfg.model_config["vocab_size"], max(lengths) + 1)
    budget = parse_budget(args.share, model_bytes(folder, cfg))
    out = {"budget": budget, "model_bytes": model_bytes(folder, cfg), "runs": {}, "chunks": {}}
    for length in lengths:
        s = Setup(folder, cfg, model, down_bias, ids, length, 1, threads=args.threads, verify=False, evict=True,
                  mlx_baseline=mlx_baseline, flash_options=flash_options(model, cfg, args))
        try:  # the chunk flash's plan chooses at this budget and context, for every row
            attach_row(s, "all", budget)
            chunk = s.model.flash_plan.prefill_step
            s.model.flash_reader.close()
        except FlashError:
            chunk = min(length, 128)
        clear(s)
        out["chunks"][length] = chunk
        weights, why = baseline_weights(s, budget)
        for rep in range(args.repeats):
            for row in rows:
                r = time_to_first_token(s, row, weights if row == "naive" else budget, length, chunk)
                if row == "naive" and why:
                    r = {"row": row, "fits": False, "reason": why}
                out["runs"].setdefault(f"{row}@{length}", []).append(r)
                if not args.quiet:
                    t = f"{r['ttft_s']:.2f} s" if r["fits"] else "does not fit"
                    print(f"  {row} {length} tokens (repeat {rep + 1}): {t}", flush=True)
    ffn = cfg.n_layers * cfg.d_ff * cfg.layout.stride
    out["ffn_bytes"] = ffn
    out["probe_gb_per_s"] = probe_rate(folder, args.threads, args.probe_bytes)
    return out


def summarize(res: dict, lengths: List[int]) -> Dict[str, dict]:
    """Per row and length, the median over repeats; the floor per length."""
    out = {}
    read_s = res["ffn_bytes"] / (res["probe_gb_per_s"] * 1e9)
    for k, runs in res["runs"].items():
        ok = [r for r in runs if r["fits"]]
        if not ok:
            out[k] = {"fits": False, "reason": runs[0]["reason"]}
            continue
        med = lambda name: float(np.median([r[name] for r in ok])) if ok[0].get(name) is not None else None
        out[k] = {"fits": True, "ttft_s": med("ttft_s"), "io_s": med("io_s"), "io_exposed_s": med("io_exposed_s"),
                  "memory_s": med("memory_s"), "compute_s": med("compute_s"), "bytes_read": med("bytes_read"),
                  "disk_bytes": med("disk_bytes"), "peak_mlx_bytes": med("peak_mlx_bytes"),
                  "mode": ok[0].get("mode"), "passes": ok[0].get("passes"), "steps": ok[0].get("steps")}
    for length in lengths:
        # the prompt's compute: what the pass spent computing (dense's FLOPs, on the same engine), else
        # the dense row's time (its FFN multiplies in MLX: slower on a CPU)
        dense, full = out.get(f"dense@{length}"), out.get(f"pass@{length}")
        compute = full["compute_s"] if full and full["fits"] else dense["ttft_s"] if dense and dense["fits"] else None
        if compute is None:
            continue
        chunks = -(-length // res["chunks"][length])
        out[f"floor@{length}"] = {"fits": True, "ttft_s": read_s * chunks + compute, "read_s": read_s * chunks,
                                  "compute_s": compute, "chunks": chunks,
                                  "compute_from": "pass" if full and full["fits"] else "dense"}
    return out


def targets(summary: Dict[str, dict]) -> List[str]:
    a, w, f = (summary.get(f"{r}@512") for r in ("pass", "window", "floor"))
    met = lambda c: "met" if c else "MISSED"
    out = []
    if a and a["fits"] and f:
        x = a["ttft_s"] / f["ttft_s"]
        out.append(f"512 tokens, pass / floor: {x:.2f}x (target <= {TARGET_FLOOR}x: {met(x <= TARGET_FLOOR)})")
    if a and a["fits"] and w and w["fits"]:
        x = w["ttft_s"] / a["ttft_s"]
        out.append(f"512 tokens, window steps / pass: {x:.2f}x (target >= {TARGET_VS_WINDOW:.0f}x: "
                   f"{met(x >= TARGET_VS_WINDOW)})")
    return out


def print_report(out: dict, cfg: FlashConfig):
    print(f"# mlx-flash time to first token: SYNTHETIC {out['geometry']} geometry, {cfg.n_layers} layers, random "
          f"weights, {cfg.quantization['bits']}-bit ({out['folder']})")
    print(f"every row's budget: {out['share']} of the model's {out['model_bytes'] / 1e9:.3f} GB = "
          f"{out['budget'] / 1e9:.3f} GB (dense: none); prompt chunks (flash's plan): "
          + ", ".join(f"{n} tokens: {c}" for n, c in out["chunks"].items())
          + f"; reads: {direct_read_method()} (flash), naive: cold mmap; probe at {MAX_CHUNK >> 20} MiB x "
          f"{out['threads']} threads: {out['probe_gb_per_s']:.2f} GB/s; FFN {out['ffn_bytes'] / 1e9:.3f} GB; "
          f"medians of {out['repeats']}")
    head = ["row (synthetic)", "prompt tokens", "time to first token s", "MB read", "I/O s", "exposed I/O s",
            "memory s", "compute s", "vs window steps", "how"]
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    f1 = lambda v: "-" if v is None else f"{v:.2f}"
    for length in out["lengths"]:
        w = out["summary"].get(f"window@{length}")
        for row in out["rows"] + ["floor"]:
            a = out["summary"].get(f"{row}@{length}")
            if a is None:
                continue
            if not a["fits"]:
                print(f"| {row} | {length} | does not fit: {a['reason']} |")
                continue
            mb = a.get("bytes_read") if a.get("bytes_read") is not None else a.get("disk_bytes")
            how = {"floor": f"{a.get('chunks')} sequential read(s) of the FFN at the probe's rate + the prompt's "
                            f"compute ({a.get('compute_from')} row)",
                   "dense": "weights in memory", "naive": "disk bytes from /proc/self/io"}.get(
                row, f"{a.get('passes') or 0} layer passes, {a.get('steps') or 0} window steps")
            speed = w["ttft_s"] / a["ttft_s"] if w and w["fits"] and row != "window" else None
            cells = [row, str(length), f"{a['ttft_s']:.2f}", "-" if mb is None else f"{mb / 1e6:.1f}",
                     f1(a.get("io_s") if row != "floor" else a.get("read_s")), f1(a.get("io_exposed_s")),
                     f1(a.get("memory_s")), f1(a.get("compute_s")), "-" if speed is None else f"{speed:.1f}x", how]
            print("| " + " | ".join(cells) + " |")
    for t in out["targets"]:
        print(f"- {t}")


def setup_arg_parser():
    p = argparse.ArgumentParser(prog="python -m mlx_flash.bench --prompts",
                                description="Time to first token at the same budget on a synthetic quantized OPT: "
                                            "dense, naive mmap, flash window steps, flash prompt pass.")
    p.add_argument("--prompts", required=True, help=f"geometry: {', '.join(GEOMETRIES)}")
    p.add_argument("--layers", type=int, default=None, help="layers of the synthetic model (default: the geometry's)")
    p.add_argument("--share", default="0.6", help="every row's DRAM budget: a share of the model or bytes")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths, comma list")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--repeats", "-r", type=int, default=1)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--probe-bytes", type=int, default=256 << 20, help="bytes the probe reads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="the synthetic model's folder (default: same-budget mode's)")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    p.add_argument("--quiet", action="store_true")
    return p


def run(argv) -> dict:
    from ..sources import models_dir

    args = setup_arg_parser().parse_args(argv)
    if args.prompts not in GEOMETRIES:
        raise FlashError(f"--prompts: unknown geometry '{args.prompts}' (choose from {', '.join(GEOMETRIES)})")
    g = GEOMETRIES[args.prompts]
    layers = args.layers or g.n_layers
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows or any(r not in ROWS for r in rows):
        raise FlashError(f"--rows: choose from {', '.join(ROWS)}")
    try:
        lengths = sorted({int(x) for x in args.lengths.split(",")})
    except ValueError:
        raise FlashError("--lengths: a comma list of token counts, e.g. 128,512")
    if lengths[0] < 2 or args.repeats < 1:
        raise FlashError("--lengths must be at least 2 tokens and --repeats at least 1")
    if args.quick:
        args.probe_bytes = min(args.probe_bytes, 8 << 20)
    args.hit, args.waste = 0.0, 0.0  # same_budget.flash_options' lookahead: not used here
    folder = Path(args.dir) if args.dir else models_dir() / f"synthetic-e2e-{g.name}-q{args.bits}-L{layers}"
    cfg = write_model(folder, g, layers, args.bits, args.group, args.seed, progress=not args.quiet)
    res = measure(args, folder, cfg, [r for r in ROWS if r in rows], lengths)
    summary = summarize(res, lengths)
    out = {"geometry": g.name, "folder": str(folder), "share": args.share, "budget": res["budget"],
           "model_bytes": res["model_bytes"], "ffn_bytes": res["ffn_bytes"], "chunks": res["chunks"],
           "probe_gb_per_s": res["probe_gb_per_s"], "threads": args.threads, "repeats": args.repeats,
           "rows": [r for r in ROWS if r in rows], "lengths": lengths, "summary": summary, "runs": res["runs"],
           "targets": targets(summary)}
    print_report(out, cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out
