"""What the benchmark reports: medians per row, the markdown tables, the targets, the figures."""

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .cli import figure
from .probe import probe_at, probe_disk, scratch_file
from .rows import HELD, LABELS, PHASE_LABELS, PHASES, READ, ROWS, key

PROBE_ROUNDS = 3
STAYED_CACHED_OK = 0.01  # share of the evicted bytes mincore may still find cached (readahead in flight)


def aggregate(runs: List[dict], dense_argmax: Optional[List[int]], dense_ppl: Optional[float]) -> dict:
    """Medians over repetitions (peak memory: the largest)."""
    if not runs:
        return {"fits": False, "reason": "not run"}
    if not runs[0]["fits"]:
        return {"fits": False, "reason": runs[0]["reason"]}
    med = lambda xs: float(np.median([x for x in xs if x is not None])) if any(x is not None for x in xs) else None
    st = [r["stats"] for r in runs]
    out = {"fits": True, "repeats": len(runs), "plan": runs[0]["plan"], "resident_bytes": runs[0]["resident_bytes"],
           "ms_total": med([r["ms_total"] for r in runs])}
    out["tokens_per_s"] = 1000.0 / out["ms_total"]
    for k in PHASES:
        out[f"ms_{k}"] = med([r["ms_other"] if k == "other" else s[f"ms_{k}"] for r, s in zip(runs, st)])
    for k in ("bytes_read_per_token", "bytes_requested_per_token", "bundles_per_token", "syscalls_per_token",
              "read_gb_per_s", "ffn_share_read", "ffn_share_predicted", "ffn_share_resident",
              "bytes_moved_per_token"):
        out[k] = med([s[k] for s in st])
    out["window_shrinks"] = max(s["window_shrinks"] for s in st)
    out["truncations"] = max(s["truncations"] for s in st)
    out["disk_bytes_per_token"] = med([r["disk_bytes_per_token"] for r in runs])
    out["prefill_s"] = med([r["prefill_s"] for r in runs])
    for k in ("major_faults_per_token", "warm_bytes_per_token", "evicted_bytes_per_token",
              "stayed_cached_bytes_per_token", "new_bundles_per_token", "filled_bundles_per_token"):
        if k in runs[0]:
            out[k] = med([r[k] for r in runs])
    for k in ("peak_bytes", "peak_mlx_bytes", "peak_page_cache_bytes", "peak_cgroup_bytes"):
        if k in runs[0]:
            out[k] = max(r[k] for r in runs)
    out["perplexity"] = float(np.exp(med([r["nll"] for r in runs])))
    if dense_argmax is not None:
        agree = [float(np.mean(np.array(r["argmax"]) == np.array(dense_argmax))) for r in runs]
        out["agreement"] = med(agree)
        out["perplexity_vs_dense"] = out["perplexity"] / dense_ppl - 1 if dense_ppl else None
    else:
        out["agreement"] = None
        out["perplexity_vs_dense"] = None
    out["ms_per_token_runs"] = [r["ms_total"] for r in runs]
    return out


def summarize(all_runs: Dict[str, List[dict]], budgets: Dict[str, int], rows: List[str],
              base_budgets: Optional[Dict[str, int]] = None) -> Dict[str, dict]:
    dense = next((r for r in all_runs.get(key("dense", "-"), []) if r["fits"]), None)
    dense_argmax = dense["argmax"] if dense else None
    dense_ppl = aggregate(all_runs[key("dense", "-")], None, None)["perplexity"] if dense else None
    out = {}
    for label, b in budgets.items():
        for row in rows:
            k = key(row, "-" if row == "dense" else label)
            if k in all_runs and k not in out:
                a = aggregate(all_runs[k], dense_argmax, dense_ppl)
                base = (base_budgets or {}).get(label, a["plan"]["budget"] if a["fits"] else None)
                a.update(row=row, label=LABELS[row],
                         budget=None if row == "dense" else base if row in ("naive", "hybrid") else b,
                         budget_label=None if row == "dense" else label, held=HELD[row], read=READ[row])
                if a["fits"] and a.get("peak_bytes") is not None and row != "dense":
                    # flash rows: everything within the budget; baselines: within what they were planned to hold
                    limit = a["plan"]["total"] if row in ("naive", "hybrid") else b
                    a["within_budget"] = a["peak_bytes"] <= limit
                out[k] = a
    for label in budgets:
        naive = out.get(key("naive", label))
        for k, a in out.items():
            if a["fits"] and (a["budget_label"] == label or a["row"] == "dense"):
                if naive and naive["fits"]:
                    a.setdefault("speedup_vs_naive", {})[label] = naive["ms_total"] / a["ms_total"]
    return out


def cold_pages(summary: Dict[str, dict], method: str, cgroup: bool) -> dict:
    """How the naive row's pages were made cold, and whether mincore saw them leave the page cache."""
    if cgroup:
        return {"method": "memory cgroup (v1) per child process", "verified": None, "stayed_cached_share": None,
                "text": "memory cgroup (v1) per child process: limit = budget + the child's baseline; the kernel "
                        "evicts (not checked page by page)"}
    out = {"method": method, "verified": None, "stayed_cached_share": None,
           "text": f"{method}, applied to each layer's pages after its copy and to the whole file after the last layer"}
    naive = [a for a in summary.values() if a["row"] == "naive" and a["fits"] and a.get("evicted_bytes_per_token")]
    if not naive:
        out["text"] += " (not checked: no naive row ran)"
        return out
    share = max(a["stayed_cached_bytes_per_token"] / a["evicted_bytes_per_token"] for a in naive)
    out.update(verified=share <= STAYED_CACHED_OK, stayed_cached_share=share)
    if out["verified"]:
        out["text"] += f"; verified with mincore after every eviction ({share:.1%} of the evicted bytes still cached)"
    else:
        out["text"] += (f"; NOT verified: mincore found {share:.0%} of the evicted bytes still cached, so pages "
                        f"stayed warm and the naive row's reads were not all cold")
        if "msync" in method:
            out["text"] += " (msync(MS_INVALIDATE) need not drop clean pages: Linux keeps them)"
    return out


def add_probe(summary: Dict[str, dict], folder: Path, threads: int, nbytes: int, scratch_size: int,
              progress: bool, path: Optional[Path] = None) -> Optional[dict]:
    """Probe the disk at each direct-read row's mean read size and thread count, in this run."""
    wanted = {}
    for a in summary.values():
        if a["fits"] and a["row"] not in ("dense", "naive") and a["syscalls_per_token"]:
            chunk = a["bytes_read_per_token"] / a["syscalls_per_token"]
            c = max(512, int(round(chunk / 512)) * 512)
            a["mean_read_bytes"] = chunk
            wanted[c] = a
    if not wanted:
        return None
    path = scratch_file(folder, scratch_size, path)
    probe = probe_disk(path, sorted(wanted), [threads], nbytes, progress=progress, rounds=PROBE_ROUNDS)
    for a in summary.values():
        if "mean_read_bytes" in a:
            gb = probe_at(probe, a["mean_read_bytes"], threads)
            a["probe_gb_per_s"] = gb
            a["share_of_probe"] = a["read_gb_per_s"] / gb if gb else None
    return probe


def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def table(summary: Dict[str, dict], budget_label: str) -> str:
    """The markdown table of one budget (the paper's Tables 2 and 3 side by side)."""
    head = ["row", "budget MB (what it covers)", "resident GB", "MB read/token", "disk MB/token", "GB/s", "of probe", "I/O ms", "memory ms",
            "predict ms", "compute ms", "total ms/token", "tokens/s", "speedup", "peak MB", "agreement", "ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in summary.values():
        if a["row"] != "dense" and a["budget_label"] != budget_label:
            continue
        if not a["fits"]:
            lines.append(f"| {a['label']} | does not fit: {a['reason']} |" + " |" * (len(head) - 2))
            continue
        compute = a["ms_attention"] + a["ms_ffn"] + a["ms_other"]
        covers = "none" if a["budget"] is None else f"{a['budget'] / 1e6:.1f} " + (
            "(weights held; the rest planned apart)" if a["row"] in ("naive", "hybrid") else "(everything)")
        cells = [a["label"], covers, fmt(a["resident_bytes"] / 1e9, ".3f"), fmt(a["bytes_read_per_token"] / 1e6, ".2f"),
                 fmt(None if a["disk_bytes_per_token"] is None else a["disk_bytes_per_token"] / 1e6, ".2f"),
                 fmt(a["read_gb_per_s"] or None, ".2f"), fmt(a.get("share_of_probe"), ".0%"),
                 fmt(a["ms_io"]), fmt(a["ms_memory"]), fmt(a["ms_predict"]), fmt(compute), fmt(a["ms_total"]),
                 fmt(a["tokens_per_s"], ".2f"), fmt(a.get("speedup_vs_naive", {}).get(budget_label), ".2f") + ("x" if a.get(
                     "speedup_vs_naive", {}).get(budget_label) else ""),
                 fmt(a.get("peak_bytes", 0) / 1e6, ".1f") + ("" if a.get("within_budget", True) else " (over)"),
                 fmt(a["agreement"], ".1%"), fmt(a["perplexity"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(summary: Dict[str, dict], budget_label: str) -> List[str]:
    """The README's targets for the built-in model, met or missed, in words."""
    naive, best = summary.get(key("naive", budget_label)), summary.get(key("all", budget_label))
    out = []
    if best and best["fits"]:
        share = best["budget"] / best["plan"]["model"]
        out.append(f"flash rows' budget: {share:.0%} of the model (README setting 50%: "
                   f"{'met' if share <= 0.5 else 'MISSED, flash needs more memory than that here'})")
    if naive and best and naive["fits"] and best["fits"]:
        ratio = naive["bytes_read_per_token"] / max(best["bytes_read_per_token"], 1)
        out.append(f"bytes read per token, naive / all: {ratio:.1f}x (target >= 10x: "
                   f"{'met' if ratio >= 10 else 'MISSED'})")
        out.append(f"ms per token, all vs naive: {best['ms_total']:.1f} vs {naive['ms_total']:.1f} "
                   f"(target lower: {'met' if best['ms_total'] < naive['ms_total'] else 'MISSED'})")
        share = best["ms_memory"] / best["ms_total"]
        out.append(f"memory management, all: {share:.1%} of the token's time (target <= 10%: "
                   f"{'met' if share <= 0.10 else 'MISSED'})")
        if best.get("share_of_probe") is not None:
            out.append(f"achieved read bandwidth, all: {best['share_of_probe']:.0%} of the probe at "
                       f"{best['mean_read_bytes'] / 1024:.1f} KiB reads (target >= 80%: "
                       f"{'met' if best['share_of_probe'] >= 0.8 else 'MISSED'})")
    elif best is not None and not best["fits"]:
        out.append("flash ('all') does not fit this budget: rerun with --dram-budget min")
    return out


def plot_breakdown(summary: Dict[str, dict], budget_label: str, path: Path, title: str):
    """Figure 1: per-token latency of each row, stacked by phase."""
    rows = [a for a in summary.values() if a["fits"] and (a["row"] == "dense" or a["budget_label"] == budget_label)]
    colors = {"io": "#d62728", "memory": "#ff7f0e", "predict": "#9467bd", "attention": "#1f77b4",
              "ffn": "#2ca02c", "other": "#7f7f7f"}
    with figure(path, title, "ms per token", size=(max(5.0, 1.3 * len(rows) + 2), 4.4), grid=False, legend=7) as ax:
        bottom = np.zeros(len(rows))
        for k in PHASES:
            vals = np.array([max(a[f"ms_{k}"] or 0.0, 0.0) for a in rows])
            ax.bar([a["label"] for a in rows], vals, bottom=bottom, label=PHASE_LABELS[k], color=colors[k])
            bottom += vals
        for i, a in enumerate(rows):
            ax.text(i, bottom[i], f"{a['ms_total']:.0f}", ha="center", va="bottom", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)


def plot_sweep(summary: Dict[str, dict], budgets: Dict[str, int], model_size: int, path: Path):
    """Figure 7: ms per token against the DRAM budget (rows that do not fit are left out)."""
    with figure(path, "Latency against the memory budget (paper Fig. 7)", "ms per token",
                "DRAM budget (% of the model)") as ax:
        for row in ROWS:
            pts = [(b / model_size, summary[key(row, l)]["ms_total"]) for l, b in budgets.items()
                   if key(row, l) in summary and summary[key(row, l)]["fits"]]
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=LABELS[row])


def plot_rows(summary: Dict[str, dict], budgets: Dict[str, int], total: int, name: str, folder: Path):
    """Figure 1 per budget, and Figure 7 when several budgets were run."""
    for i, (label, b) in enumerate(budgets.items()):
        png = "latency_breakdown.png" if len(budgets) == 1 else f"latency_breakdown_{i}.png"
        plot_breakdown(summary, label, folder / png, f"{name}: ms per token at budget {label} ({b / total:.0%}) "
                                                     f"(paper Fig. 1)")
    if len(budgets) > 1:
        plot_sweep(summary, budgets, total, folder / "latency_vs_budget.png")


def print_report(r: dict, cfg) -> None:
    """The benchmark's output: how it was measured, one table per budget, the targets."""
    total, rows, summary = r["model_bytes"], r["rows"], r["summary"]
    header = [
        f"# mlx-flash benchmark: {r['model']}",
        f"model: {cfg.architecture}, {cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, bundles "
        f"{cfg.dtype}{' q' + str(cfg.quantization['bits']) if cfg.quantization else ''} of {cfg.layout.stride} B; "
        f"size {total / 1e6:.1f} MB (resident weights + FFN bundles)",
        f"tokens: {r['prompt_tokens']} prompt + {r['gen_tokens']} decode steps of held-out text (teacher-forced: "
        f"every row sees the same tokens); {r['repeats']} interleaved repetitions after a warm-up, medians",
        f"cold pages (naive row): {r['eviction']['text']}",
        f"flash and hybrid rows read with {r['direct_reads']}, {r['threads']} threads, CRC checks "
        f"{'on' if r['verify'] else 'off'}",
    ]
    if r["cgroup"]:
        c = r["cgroup"]
        header.append(f"process baseline (the child's cgroup usage after importing its libraries, loading the "
                      f"tokenizer and starting its read threads once, before any weight): "
                      f"{c['baseline_bytes'] / 1e6:.1f} MB (its RSS then: {c['baseline_rss_bytes'] / 1e6:.1f} MB); "
                      f"cgroup limit = budget + baseline + {c['slack_bytes'] / 1e6:.0f} MB of slack for the run's "
                      f"thread stacks and Python objects")
    else:
        header.append(f"process RSS with the resident weights loaded: {r['baseline_rss_bytes'] / 1e6:.1f} MB; peak "
                      f"memory below = MLX's peak allocation + ffn.bundles pages cached (mincore), per row")
    gi = r["coalescing"]
    if "all" in rows and gi:
        meas = ", ".join(f"gap {g}: {v:.1f} ms" for g, v in gi.get("measured", {}).items())
        header.append(f"'all' row: coalesce gap {gi.get('gap')} ({gi.get('method', '')}{': ' + meas if meas else ''})")
    print("\n".join(header))
    for label, b in r["budgets"].items():
        base = r["baseline_budgets"][label]
        print(f"\n## DRAM budget {label}: {b / 1e6:.1f} MB ({b / total:.0%} of the model) for the flash rows, "
              f"everything included; naive and hybrid hold weights up to {base / 1e6:.1f} MB "
              f"({base / total:.0%}), plus one streamed layer, KV cache and working memory\n")
        print(table(summary, label))
        for a in summary.values():
            if a.get("budget_label") == label and a["fits"] and a.get("within_budget") is False:
                print(f"note: {a['label']} peaked at {a['peak_bytes'] / 1e6:.1f} MB, over the budget")
        for line in r["targets"][label]:
            print(f"- {line}")
    probe = r["probe"]
    if probe:
        print(f"\nprobe: direct random reads of {probe['file']} at each row's mean read size, {r['threads']} threads, "
              f"{probe['bytes_per_point'] / 2**20:.0f} MiB per point: " + ", ".join(
                  f"{p['chunk'] / 1024:.1f} KiB {p['gb_per_s']:.2f} GB/s" for p in probe["points"]))
    print("\ncolumns: MB read/token = bytes the row's reads fetched (logical); disk MB/token = bytes this process "
          "read from storage (Linux: /proc/self/io, macOS: proc_pid_rusage; - where unknown); of probe = achieved "
          "GB/s against random direct reads of the row's mean read size at its thread count (hybrid reads "
          "sequentially, so it can pass 100%); compute = attention + FFN + the rest; "
          "peak MB = MLX's peak + ffn.bundles pages in the page cache (naive: with the kernel's async readahead); "
          "agreement = greedy next-token agreement with dense; ppl = perplexity of the text's next tokens")
