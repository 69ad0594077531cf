"""The paper's Tables 2 and 3 (and Figures 1 and 7) on one model, measured in one process.

    python -m mlx_flash.bench --model models/smollm2-135m [--dram-budget 0.5|min|60M] [--prompt-tokens 128]
        [--gen-tokens 256] [--repeats 3] [--rows dense,naive,hybrid,predictor,windowing,all]
        [--json out.json] [--plots DIR] [--quick] [--cgroup] [--sweep 0.35:0.8:0.05]
    python -m mlx_flash.bench --scale opt-6.7b [--layers 32] [--tokens 32] ...   (see mlx_flash.bench.scale)

Every row runs the same token sequence (held-out text: --prompt-tokens of prompt,
then --gen-tokens decode steps fed the text's next token) through the same model
object; only the FFN provider differs (models/ffn.py's contract):

| row        | in DRAM                                              | read per token                          |
| dense      | everything (upper bound; only where it fits)         | nothing                                 |
| naive      | attention, embeddings + whole FFN layers up to half  | other layers, through a cold memory map |
| hybrid     | the same                                             | other layers, large direct reads        |
| predictor  | attention, embeddings, predictors, one token's rows  | every predicted neuron, every token     |
| windowing  | + the neuron window                                  | only neurons new to the window          |
| all        | the same                                             | the same, reads coalesced over gaps     |

"Half" is --baseline-share of the weights (default: the budget when it is a share
of the model, else 0.5); the flash rows hold everything, KV cache and working
memory included, within --dram-budget (`flash_model.plan`), which may be 'min':
the smallest budget their plan accepts.

Repetitions are interleaved (rep 1 of every row, then rep 2, ...) after one
untimed warm-up per row; the table reports medians. Per decode token: I/O (page
faults or direct reads), memory management (copies, evictions, window
bookkeeping), prediction, compute (attention, FFN, the rest), peak memory, and
quality against the dense row: greedy next-token agreement and perplexity on
the same text.

Cold pages, two ways (DESIGN.md, "Measuring honestly"):
- default: the naive row evicts each layer's pages after use (madvise + fadvise
  DONTNEED) and the whole file after the last layer, and checks with mincore;
- --cgroup: every row but dense runs in a child process inside a memory cgroup
  (v1) whose limit is the row's memory (flash: the budget; naive and hybrid: what
  they were planned to hold) plus the child's own baseline (its cgroup usage after
  importing its libraries and loading the tokenizer, before any weight) plus
  --cgroup-slack; the kernel decides what stays cached. If the cgroup cannot be
  created the command stops.
Flash rows and hybrid read with O_DIRECT. /proc/self/io's read_bytes gives the
bytes that really came from the disk, beside the bytes each row asked for.
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import FlashError, cli
from ..format import FlashConfig, round_up
from ..flash.budget import DEFAULT_THREADS, attach_flash, model_bytes, parse_budget, plan
from ..load import is_flash_folder, load_resident
from ..baselines import DEFAULT_SHARE, attach_baseline, attach_dense_timed, resident_param_bytes
from ..flash.neuron_cache import NeuronCache

ROWS = ("dense", "naive", "hybrid", "predictor", "windowing", "all")
FLASH_ROWS = ("predictor", "windowing", "all")
LABELS = {"dense": "dense", "naive": "naive mmap", "hybrid": "hybrid", "predictor": "+ predictor",
          "windowing": "+ windowing", "all": "all (+ coalescing)"}
HELD = {
    "dense": "everything",
    "naive": "attention, embeddings + whole FFN layers up to the budget",
    "hybrid": "the same as naive",
    "predictor": "attention, embeddings, predictors, one token's neurons",
    "windowing": "+ the neuron window",
    "all": "the same as windowing",
}
READ = {
    "dense": "nothing",
    "naive": "the other FFN layers, through a memory map whose pages are cold every token",
    "hybrid": "the other FFN layers, with large sequential direct reads",
    "predictor": "every predicted neuron's bundle, every token (nothing reused)",
    "windowing": "only the neurons new to the window",
    "all": "the same, with reads coalesced across small gaps (gap chosen by measurement)",
}
DEFAULT_BUDGET = "0.5"
DEFAULT_PROMPT = 128
DEFAULT_GEN = 256
DEFAULT_REPEATS = 3
GAP_CANDIDATES = (0, 1, 2, 4, 8, 16)
PROBE_BYTES = 64 << 20
PROBE_ROUNDS = 3
KV_STEP = 256  # mlx_lm.models.cache.KVCache grows by this many tokens
PHASES = ("io", "memory", "predict", "attention", "ffn", "other")
PHASE_LABELS = {"io": "I/O (reads, page faults)", "memory": "memory management", "predict": "prediction",
                "attention": "attention & rest of layer", "ffn": "FFN compute", "other": "LM head, sampling, Python"}


# MARK: - the flash rows' caches


class NoReuseCache(NeuronCache):
    """'+ predictor': nothing survives a token, so every predicted neuron is read every token."""

    def step(self, active):
        n = self.n
        self.neuron_to_slot[self.slot_to_neuron[:n]] = -1
        self.slot_to_neuron[:n] = -1
        self.n = 0
        self.reset()
        return super().step(active)


def fill_gaps(new: np.ndarray, gap: int, cached: np.ndarray, spare: int) -> np.ndarray:
    """`new` (sorted) plus the absent neurons of every gap of <= gap neurons none of which is cached
    (a cached one would be read twice), left to right while `spare` rows remain."""
    missing = np.diff(new) - 1  # (m-1,) neurons between consecutive new ones
    cs = np.concatenate([[0], np.cumsum(cached, dtype=np.int64)])  # cs[i]: cached among [0, i)
    cached_between = cs[new[1:]] - cs[new[:-1] + 1]
    fill = (missing > 0) & (missing <= gap) & (cached_between == 0)
    fill &= np.cumsum(np.where(fill, missing, 0)) <= max(spare, 0)
    reps = np.append(np.where(fill, missing, 0), 0) + 1  # (m,) neurons each new one heads
    first = np.repeat(np.cumsum(reps) - reps, reps)
    return np.repeat(new, reps) + (np.arange(reps.sum()) - first)


class CoalescingCache(NeuronCache):
    """'all': new neurons at most `gap` apart are read as one run; the absent neurons in between
    come along (computed on, and kept only if a later token predicts them)."""

    def __init__(self, d_ff: int, slots: int, window: int, rows, gap: int):
        super().__init__(d_ff, slots, window, rows)
        self.gap, self.filled = gap, 0

    def step(self, active):
        new, start = super().step(active)
        if self.gap > 0 and len(new) > 1:
            full = fill_gaps(new, self.gap, self.neuron_to_slot >= 0, self.slots - start - len(new))
            self.filled += len(full) - len(new)
            self._pending = (full, start)
            self.stats.last_new = len(full)
            new = full
        return new, start


# MARK: - measuring


def disk_read_bytes() -> int:
    """Bytes this process fetched from storage (page-cache fills and direct reads), all threads."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def held_out_ids(tokenizer, n: int) -> np.ndarray:
    from ..evaluate import text_tokens
    from ..flash.sparsity import HELDOUT_TEXT

    return text_tokens(tokenizer, HELDOUT_TEXT, n)


@dataclass
class Setup:
    """What every row shares: one model object, the budget, the token sequence."""

    folder: Path
    cfg: FlashConfig
    model: object
    down_bias: list
    ids: np.ndarray  # prompt_tokens + gen_tokens + 1 held-out token ids
    prompt_tokens: int
    gen_tokens: int
    threads: int = DEFAULT_THREADS
    verify: bool = False
    evict: bool = True
    window: Optional[int] = None
    recall: Optional[float] = None
    cgroup: Optional[Path] = None  # the child's own cgroup (limit set per budget)
    baseline: int = 0  # the child's cgroup usage before loading weights
    slack: int = 0  # added to the cgroup limit: the run's thread stacks and Python objects
    mlx_baseline: int = 0  # MLX memory held by others in this process before the model was loaded

    @property
    def kv_tokens(self) -> int:
        """What mlx-lm's KV cache really allocates for the sequence: steps of KV_STEP tokens."""
        return round_up(self.prompt_tokens + self.gen_tokens + 1, KV_STEP)


def load_setup(folder, prompt_tokens: int, gen_tokens: int, before_weights=None, **opts) -> Setup:
    """Tokens first, then the resident weights; `before_weights()` runs in between (the cgroup baseline)."""
    from ..sources import load_tokenizer

    folder = Path(folder)
    if not is_flash_folder(folder):
        raise FlashError(f"{folder} is not a converted flash model: run python -m mlx_flash.convert first")
    cfg = FlashConfig.load(folder)
    cfg.check_files(folder)
    if prompt_tokens < 1 or gen_tokens < 1:
        raise FlashError("--prompt-tokens and --gen-tokens must be at least 1")
    ids = held_out_ids(load_tokenizer(folder), prompt_tokens + gen_tokens)
    mx.set_cache_limit(0)  # freed buffers go back to the OS: memory figures are what is live
    gc.collect()
    if before_weights is not None:
        before_weights()
    mlx_baseline = mx.get_active_memory()
    model, down_bias = load_resident(folder, cfg)
    return Setup(folder, cfg, model, down_bias, ids, prompt_tokens, gen_tokens, mlx_baseline=mlx_baseline, **opts)


def predictor_bytes(folder: Path, cfg: FlashConfig) -> int:
    if cfg.predictors is None:
        return 0
    return sum(v.nbytes for v in mx.load(str(folder / cfg.predictors["file"])).values())


def min_flash_budget(s: Setup) -> int:
    """The smallest budget flash mode's plan accepts (bisection over plan())."""
    if s.cfg.predictors is None:
        raise FlashError(f"{s.folder} has no predictors: run python -m mlx_flash.train_predictors first")
    clear(s)
    res, pred = resident_param_bytes(s.model, s.down_bias), predictor_bytes(s.folder, s.cfg)
    lo, hi = 0, 4 * model_bytes(s.folder, s.cfg) + res + pred
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            plan(s.folder, s.cfg, res, pred, mid, s.window, s.kv_tokens, None, s.recall)
            hi = mid
        except FlashError:
            lo = mid + 1
    return lo


def clear(s: Setup):
    """Empty the FFN slots and drop the previous row's objects."""
    for layer in s.model.layers:
        layer.mlp = nn.Module()
    for name in ("flash_stats", "flash_plan", "flash_reader"):
        if hasattr(s.model, name):
            try:
                delattr(s.model, name)
            except AttributeError:
                s.model.pop(name, None)
    gc.collect()
    mx.clear_cache()


@dataclass
class Row:
    """One attached configuration: its statistics and what to close."""

    stats: object
    plan: dict
    resident_bytes: int  # weights and neuron buffers held in DRAM
    close: object
    map_stats: object = None
    caches: list = None


def attach_row(s: Setup, row: str, budget: int, gap: int = 0) -> Row:
    """Give the model this row's FFN providers (raises FlashError when the budget cannot hold it)."""
    clear(s)
    cfg = s.cfg
    if row == "dense":
        avail = mem_available()
        if avail is not None and model_bytes(s.folder, cfg) > 0.8 * avail:
            raise FlashError(f"the whole model ({model_bytes(s.folder, cfg) / 1e9:.1f} GB) does not fit in this "
                             f"machine's available memory ({avail / 1e9:.1f} GB)")
        a = attach_dense_timed(s.model, s.folder, cfg, s.down_bias)
        res = resident_param_bytes(s.model, s.down_bias)
        return Row(a.stats, {"budget": None}, res, a.close)
    if row in ("naive", "hybrid"):
        a = attach_baseline(s.model, s.folder, cfg, s.down_bias, "mmap" if row == "naive" else "hybrid",
                            weights_budget=budget, kv_tokens=s.kv_tokens, threads=s.threads, verify=s.verify,
                            evict=s.evict)
        return Row(a.stats, a.plan.to_dict(), a.plan.weights_in_memory, a.close, a.map_stats)
    if cfg.predictors is None:
        raise FlashError(f"{s.folder} has no predictors: run python -m mlx_flash.train_predictors --model {s.folder}")
    attach_flash(s.model, s.folder, cfg, s.down_bias, dram_budget=budget, window=1 if row == "predictor" else s.window,
                 threads=s.threads, verify=s.verify, kv_tokens=s.kv_tokens, recall=s.recall)
    pl = s.model.flash_plan
    caches = []
    for layer in s.model.layers:
        f = layer.mlp
        if row == "predictor":
            f.cache = NoReuseCache(cfg.d_ff, f.cache.slots, 1, rows=f.buffer.np)
        elif row == "all":
            f.cache = CoalescingCache(cfg.d_ff, f.cache.slots, pl.window, f.buffer.np, gap)
        caches.append(f.cache)
    reader = s.model.flash_reader
    return Row(s.model.flash_stats, {**pl.to_dict(), "coalesce_gap": gap if row == "all" else 0},
               pl.resident + pl.predictors + pl.buffers, reader.close, caches=caches)


def cgroup_file(s: Setup, name: str) -> Path:
    return s.cgroup / name


def run_once(s: Setup, row: str, budget: int, gap: int = 0, prompt_tokens=None, gen_tokens=None) -> dict:
    """One pass of the token sequence through one row; per decode token figures."""
    from mlx_lm.models.cache import make_prompt_cache

    P = prompt_tokens or s.prompt_tokens
    G = gen_tokens or s.gen_tokens
    if s.cgroup is not None:
        cgroup_file(s, "memory.limit_in_bytes").write_text("-1")  # the previous row's limit goes
    try:
        r = attach_row(s, row, budget, gap)
    except FlashError as e:
        clear(s)
        return {"row": row, "fits": False, "reason": str(e)}
    if s.cgroup is not None and row != "dense":
        # flash rows: their budget; baselines: what they were planned to hold (weights + one layer + KV + working)
        limit = (r.plan["total"] if row in ("naive", "hybrid") else budget) + s.baseline + s.slack
        try:
            cgroup_file(s, "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            r.close()
            clear(s)
            raise FlashError(f"cannot set the cgroup's limit to {limit / 1e6:.1f} MB ({e.strerror}): the process "
                             f"already holds more than that")
    ids = s.ids
    try:
        gc.collect()
        mx.reset_peak_memory()
        if s.cgroup is not None:
            cgroup_file(s, "memory.max_usage_in_bytes").write_text("0")
        cache = make_prompt_cache(s.model)
        t0 = time.perf_counter()
        s.model(mx.array(ids[:P])[None], cache=cache)  # like mlx-lm: the prompt's logits are never computed
        mx.eval([c.state for c in cache])
        prefill_s = time.perf_counter() - t0
        disk0 = disk_read_bytes()
        caches = r.caches or []
        new0 = sum(c.stats.new_neurons - getattr(c, "filled", 0) for c in caches)
        fill0 = sum(getattr(c, "filled", 0) for c in caches)
        times, argmax, nll = [], [], []
        for t in range(G):
            t0 = time.perf_counter()
            logits = s.model(mx.array(ids[P + t : P + t + 1])[None], cache=cache)[0, -1]
            lp = logits - mx.logsumexp(logits)
            mx.eval(lp)
            times.append(time.perf_counter() - t0)
            argmax.append(int(mx.argmax(lp)))
            nll.append(-float(lp[int(ids[P + t + 1])]))
        disk1 = disk_read_bytes()
        snap = r.stats.snapshot()
        peak_mlx = mx.get_peak_memory() - s.mlx_baseline
        peak_cached = r.map_stats.peak_cached_bytes if r.map_stats is not None else 0
        out = {
            "row": row, "fits": True, "plan": r.plan, "resident_bytes": r.resident_bytes,
            "prompt_tokens": P, "gen_tokens": G, "prefill_s": prefill_s,
            "ms_total": 1000.0 * float(np.mean(times)), "ms_tokens": [1000.0 * x for x in times],
            "argmax": argmax, "nll": float(np.mean(nll)),
            "disk_bytes_per_token": (disk1 - disk0) / G if disk0 >= 0 else None,
            "peak_mlx_bytes": peak_mlx, "peak_page_cache_bytes": peak_cached,
            "peak_bytes": peak_mlx + peak_cached,
            "stats": snap,
        }
        if s.cgroup is not None and row != "dense":
            out["peak_cgroup_bytes"] = int(cgroup_file(s, "memory.max_usage_in_bytes").read_text()) - s.baseline
            out["cgroup_failcnt"] = int(cgroup_file(s, "memory.failcnt").read_text())
        if r.map_stats is not None:
            out["major_faults_per_token"] = r.map_stats.major_faults / G
            out["warm_bytes_per_token"] = r.map_stats.warm_bytes / G
        if caches:  # what the windows asked for during decode, and the gap fillers on top
            out["new_bundles_per_token"] = (sum(c.stats.new_neurons - getattr(c, "filled", 0) for c in caches)
                                            - new0) / G
            out["filled_bundles_per_token"] = (sum(getattr(c, "filled", 0) for c in caches) - fill0) / G
        out["ms_other"] = out["ms_total"] - sum(snap[f"ms_{k}"] for k in PHASES if k != "other")
        return out
    finally:
        r.close()
        clear(s)


def choose_gap(s: Setup, budget: int, candidates, tokens: int, rounds: int = 2, progress=None) -> dict:
    """The coalescing gap of the 'all' row, by measurement: I/O + memory + FFN ms per token of
    short interleaved runs at each candidate; the fastest median wins."""
    if len(candidates) == 1:
        return {"gap": candidates[0], "measured": {}}
    times = {g: [] for g in candidates}
    for _ in range(rounds):
        for g in candidates:
            r = run_once(s, "all", budget, g, prompt_tokens=min(s.prompt_tokens, 16), gen_tokens=tokens)
            if progress is not None:
                progress.update(1)
            if not r["fits"]:
                return {"gap": 0, "measured": {}, "reason": r["reason"]}
            st = r["stats"]
            times[g].append(st["ms_io"] + st["ms_memory"] + st["ms_ffn"])
    med = {g: float(np.median(v)) for g, v in times.items()}
    return {"gap": min(med, key=med.get), "measured": med,
            "method": f"I/O + memory + FFN ms/token, median of {rounds} interleaved runs of {tokens} tokens"}


# MARK: - summarizing


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
    for k in ("major_faults_per_token", "warm_bytes_per_token", "new_bundles_per_token", "filled_bundles_per_token"):
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


def key(row: str, budget_label: str) -> str:
    return f"{row}@{budget_label}"


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


def add_probe(summary: Dict[str, dict], folder: Path, threads: int, nbytes: int, scratch_size: int,
              progress: bool, path: Optional[Path] = None) -> Optional[dict]:
    """Probe the disk at each direct-read row's mean read size and thread count, in this run."""
    from .probe import probe_at, probe_disk, scratch_file

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
    head = ["row", "resident GB", "MB read/token", "disk MB/token", "GB/s", "of probe", "I/O ms", "memory ms",
            "predict ms", "compute ms", "total ms/token", "tokens/s", "speedup", "peak MB", "agreement", "ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in summary.values():
        if a["row"] != "dense" and a["budget_label"] != budget_label:
            continue
        if not a["fits"]:
            lines.append(f"| {a['label']} | does not fit: {a['reason']} |" + " |" * (len(head) - 2))
            continue
        compute = a["ms_attention"] + a["ms_ffn"] + a["ms_other"]
        cells = [a["label"], fmt(a["resident_bytes"] / 1e9, ".3f"), fmt(a["bytes_read_per_token"] / 1e6, ".2f"),
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [a for a in summary.values() if a["fits"] and (a["row"] == "dense" or a["budget_label"] == budget_label)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 4.4))
    bottom = np.zeros(len(rows))
    colors = {"io": "#d62728", "memory": "#ff7f0e", "predict": "#9467bd", "attention": "#1f77b4",
              "ffn": "#2ca02c", "other": "#7f7f7f"}
    for k in PHASES:
        vals = np.array([max(a[f"ms_{k}"] or 0.0, 0.0) for a in rows])
        ax.bar([a["label"] for a in rows], vals, bottom=bottom, label=PHASE_LABELS[k], color=colors[k])
        bottom += vals
    for i, a in enumerate(rows):
        ax.text(i, bottom[i], f"{a['ms_total']:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(summary: Dict[str, dict], budgets: Dict[str, int], model_size: int, path: Path):
    """Figure 7: ms per token against the DRAM budget (rows that do not fit are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in ROWS:
        pts = [(b / model_size, summary[key(row, l)]["ms_total"]) for l, b in budgets.items()
               if key(row, l) in summary and summary[key(row, l)]["fits"]]
        if pts:
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=LABELS[row])
    ax.set_xlabel("DRAM budget (% of the model)")
    ax.set_ylabel("ms per token")
    ax.set_title("Latency against the memory budget (paper Fig. 7)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# MARK: - running


def resolve_budgets(s: Setup, budget: str, sweep: Optional[str]) -> Dict[str, int]:
    total = model_bytes(s.folder, s.cfg)
    if sweep:
        try:
            lo, hi, step = (float(x) for x in sweep.split(":"))
        except ValueError:
            raise FlashError(f"--sweep '{sweep}': expected lo:hi:step fractions, e.g. 0.35:0.8:0.05")
        if not 0 < lo <= hi <= 1 or step <= 0:
            raise FlashError("--sweep fractions must satisfy 0 < lo <= hi <= 1 and step > 0")
        fr = np.round(np.arange(lo, hi + step / 2, step), 4)
        return {f"{f:.2f}": int(f * total) for f in fr}
    if str(budget).strip().lower() == "min":
        b = min_flash_budget(s)
        return {"min": b}
    return {str(budget): parse_budget(budget, total)}


def baseline_budgets(s: Setup, budgets: Dict[str, int], share: Optional[str]) -> Dict[str, int]:
    """The weights naive and hybrid hold, per budget: --baseline-share when given, else the budget
    itself when it is a share of the model (0.5), else half the model (the paper's)."""
    total = model_bytes(s.folder, s.cfg)
    if share is not None:
        b = parse_budget(share, total)
        return {label: b for label in budgets}
    out = {}
    for label, b in budgets.items():
        try:
            fraction = float(label) <= 1.0
        except ValueError:
            fraction = False
        out[label] = b if fraction else int(DEFAULT_SHARE * total)
    return out


def run_all(s: Setup, rows: List[str], budgets: Dict[str, int], repeats: int, gap, gap_tokens: int,
            candidates=GAP_CANDIDATES, warmup: bool = True, progress: bool = True,
            base_budgets: Optional[Dict[str, int]] = None) -> dict:
    """Warm-up, gap calibration, then interleaved repetitions; returns the raw runs."""
    from tqdm import tqdm

    base_budgets = base_budgets or baseline_budgets(s, budgets, None)
    configs = []
    for label, b in budgets.items():
        for row in rows:
            if row == "dense":
                if (row, "-") not in [(r, l) for r, l, _ in configs]:
                    configs.append((row, "-", 0))
            else:
                configs.append((row, label, base_budgets[label] if row in ("naive", "hybrid") else b))
    auto = gap == "auto" and "all" in rows
    total = len(configs) * (repeats + (1 if warmup else 0)) + (2 * len(candidates) if auto and len(candidates) > 1 else 0)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    runs: Dict[str, List[dict]] = {key(r, l): [] for r, l, _ in configs}
    gap_info = {"gap": 0 if gap == "auto" else int(gap), "measured": {}, "method": "given"}
    skip = set()
    if warmup:
        for row, label, b in configs:
            bar.set_postfix_str(f"warm-up {row}")
            r = run_once(s, row, b, gap_info["gap"], prompt_tokens=min(s.prompt_tokens, 8), gen_tokens=2)
            if not r["fits"]:
                skip.add(key(row, label))
                runs[key(row, label)].append(r)
            bar.update(1)
    if auto:
        bar.set_postfix_str("coalescing gap")
        first = next(b for l, b in budgets.items() if key("all", l) not in skip) if any(
            key("all", l) not in skip for l in budgets) else None
        if first is not None:
            gap_info = choose_gap(s, first, list(candidates), gap_tokens, progress=bar)
    for rep in range(repeats):
        for row, label, b in configs:
            k = key(row, label)
            if k in skip:
                bar.update(1)
                continue
            bar.set_postfix_str(f"rep {rep + 1} {row}" + ("" if row == "dense" else f" @ {label}"))
            r = run_once(s, row, b, gap_info["gap"] if row == "all" else 0)
            if not r["fits"]:
                skip.add(k)
            runs[k].append(r)
            if r["fits"]:
                bar.set_postfix_str(f"{row}: {r['ms_total']:.0f} ms/token")
            bar.update(1)
    bar.close()
    return {"runs": runs, "coalescing": gap_info}


# MARK: - the cgroup child


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


def child_main(args, rows: List[str]):
    """Inside the cgroup (joined by _CHILD before any import): the baseline after the libraries and
    the tokenizer, before any weight; then the rows, each under limit = budget + baseline."""
    cg = Path(args.cgroup_child)
    measured = {}

    def measure():
        import mlx_lm.models.cache  # noqa: F401  what the rows import lazily
        import tqdm  # noqa: F401
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.threads) as pool:  # the threads' libc and Python machinery, once
            list(pool.map(time.sleep, [0.001] * args.threads))
        gc.collect()
        measured["cgroup"] = int((cg / "memory.usage_in_bytes").read_text())
        measured["rss"] = rss_bytes()

    s = load_setup(args.model, args.prompt_tokens, args.gen_tokens, before_weights=measure, threads=args.threads,
                   verify=args.verify, evict=False, window=args.window, recall=args.recall)
    s.cgroup, s.baseline, s.slack = cg, measured["cgroup"], args.cgroup_slack
    budgets, base = json.loads(args.child_budgets)
    res = run_all(s, rows, budgets, args.repeats, args.coalesce_gap, args.gap_tokens,
                  candidates=tuple(parse_ints(args.gap_candidates)), progress=False, base_budgets=base)
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


# MARK: - command line


def parse_size_arg(text: str) -> int:
    from .probe import parse_size

    return parse_size(text)


def parse_ints(text: str) -> List[int]:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise FlashError(f"'{text}' is not a list of integers")


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Benchmark dense, naive mmap, hybrid and flash rows on one model "
                                            "(the paper's Tables 2-3, Figures 1 and 7).")
    p.add_argument("--model", "-M", default=None, help="converted flash model folder with trained predictors")
    p.add_argument("--dram-budget", "-b", default=DEFAULT_BUDGET,
                   help="fraction of the model (0.5), bytes (60M), or 'min': the smallest flash fits")
    p.add_argument("--baseline-share", default=None,
                   help="weights naive and hybrid keep in memory: a share of the model or bytes (default: the "
                        "budget when it is a share, else 0.5)")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT)
    p.add_argument("--gen-tokens", "-n", type=int, default=DEFAULT_GEN)
    p.add_argument("--repeats", "-r", type=int, default=DEFAULT_REPEATS)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--json", default=None, help="write every figure (and every run) to this file")
    p.add_argument("--plots", default=None, help="write PNG figures into this folder")
    p.add_argument("--quick", action="store_true", help="tiny settings, for tests and a first look")
    p.add_argument("--cgroup", action="store_true",
                   help="run the rows (dense excepted) inside a memory cgroup limited to budget + baseline")
    p.add_argument("--sweep", default=None, help="budgets lo:hi:step (fractions): latency against memory (Fig. 7)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="read threads (flash and hybrid)")
    p.add_argument("--window", type=int, default=None, help="window of the windowing rows (default: calibrated)")
    p.add_argument("--recall", type=float, default=None, help="predictor recall level (default: calibrated)")
    p.add_argument("--coalesce-gap", default="auto", help="gap of the 'all' row, or 'auto' (measured)")
    p.add_argument("--gap-candidates", default=",".join(map(str, GAP_CANDIDATES)))
    p.add_argument("--gap-tokens", type=int, default=8, help="decode tokens per gap calibration run")
    p.add_argument("--verify", action="store_true", help="check every bundle's CRC while reading (off: the "
                                                         "paper's reads have none)")
    p.add_argument("--no-probe", action="store_true", help="skip the disk probe at the rows' read sizes")
    p.add_argument("--probe-bytes", default=str(PROBE_BYTES), help="bytes per probe point (default 64M)")
    p.add_argument("--probe-file", default=None, help="file the probe reads (default: ffn.bundles when at least "
                                                      "256 MB, else a scratch file written once in the model folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # scale mode (mlx_flash.bench.scale)
    p.add_argument("--scale", default=None, help="synthetic model at real size, e.g. opt-6.7b (see mlx_flash.bench.scale)")
    p.add_argument("--scale-dir", default=None, help="where the synthetic model is written (default: models/)")
    p.add_argument("--layers", type=int, default=None, help="scale mode: layers written and measured")
    p.add_argument("--tokens", type=int, default=None, help="scale mode: tokens replayed per flash row")
    p.add_argument("--hybrid-tokens", type=int, default=None, help="scale mode: tokens of the hybrid row")
    p.add_argument("--compute", action="store_true", help="scale mode: also time the FFN compute")
    p.add_argument("--cgroup-slack", type=parse_size_arg, default=8 << 20,
                   help="--cgroup: added to the limit for the run's own thread stacks and Python objects (default 8M)")
    # internal: the cgroup child
    p.add_argument("--cgroup-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-budgets", default=None, help=argparse.SUPPRESS)
    return p


QUICK = {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1, "gap_candidates": "0,4", "gap_tokens": 2,
         "probe_bytes": str(1 << 20)}


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
    args = setup_arg_parser().parse_args(argv)
    if args.quick:
        apply_quick(args, argv)
    if args.scale:
        from .scale import scale_main

        return scale_main(args)
    if args.model is None:
        raise FlashError("--model is required (or --scale for the synthetic model)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise FlashError(f"--rows: unknown row {', '.join(bad) or '(none)'} (choose from {', '.join(ROWS)})")
    rows = [r for r in ROWS if r in rows]  # the table's order
    if args.repeats < 1:
        raise FlashError("--repeats must be at least 1")
    if args.coalesce_gap != "auto":
        args.coalesce_gap = parse_ints(args.coalesce_gap)[0]
    if args.cgroup_child:
        return child_main(args, rows)
    if args.cgroup and not Path("/sys/fs/cgroup/memory").is_dir():
        cgroup_root()  # raises the clear message

    s = load_setup(args.model, args.prompt_tokens, args.gen_tokens, threads=args.threads, verify=args.verify,
                   window=args.window, recall=args.recall)
    baseline_rss = rss_bytes()  # after loading the resident weights (the cgroup child measures before)
    budgets = resolve_budgets(s, args.dram_budget, args.sweep)
    base = baseline_budgets(s, budgets, args.baseline_share)
    total = model_bytes(s.folder, s.cfg)
    candidates = tuple(parse_ints(args.gap_candidates))
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
        from .probe import SCRATCH_SIZE, parse_size

        probe = add_probe(summary, s.folder, args.threads, parse_size(args.probe_bytes),
                          0 if args.quick else SCRATCH_SIZE, progress=not args.quiet,
                          path=args.probe_file and Path(args.probe_file))

    # -- report
    cfg = s.cfg
    eviction = ("memory cgroup (v1) per child process: limit = budget + the child's baseline; the kernel "
                "evicts" if args.cgroup else "explicit: madvise(MADV_DONTNEED) + posix_fadvise(DONTNEED) on each "
                "layer's pages after its copy, the whole file after the last layer; checked with mincore")
    header = [
        f"# mlx-flash benchmark: {s.folder}",
        f"model: {cfg.architecture}, {cfg.n_layers} layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, bundles "
        f"{cfg.dtype}{' q' + str(cfg.quantization['bits']) if cfg.quantization else ''} of {cfg.layout.stride} B; "
        f"size {total / 1e6:.1f} MB (resident weights + FFN bundles)",
        f"tokens: {s.prompt_tokens} prompt + {s.gen_tokens} decode steps of held-out text (teacher-forced: every "
        f"row sees the same tokens); {args.repeats} interleaved repetitions after a warm-up, medians",
        f"cold pages (naive row): {eviction}; flash and hybrid rows read with O_DIRECT, {args.threads} threads, "
        f"CRC checks {'on' if args.verify else 'off'}",
    ]
    if args.cgroup:
        c = res["cgroup"]
        header.append(f"process baseline (the child's cgroup usage after importing its libraries, loading the "
                      f"tokenizer and starting its read threads once, before any weight): "
                      f"{c['baseline_bytes'] / 1e6:.1f} MB (its RSS then: {c['baseline_rss_bytes'] / 1e6:.1f} MB); "
                      f"cgroup limit = budget + baseline + {c['slack_bytes'] / 1e6:.0f} MB of slack for the run's "
                      f"thread stacks and Python objects")
    else:
        header.append(f"process RSS with the resident weights loaded: {baseline_rss / 1e6:.1f} MB; peak memory "
                      f"below = MLX's peak allocation + ffn.bundles pages cached (mincore), per row")
    gi = res.get("coalescing") or {}
    if "all" in rows and gi:
        meas = ", ".join(f"gap {g}: {v:.1f} ms" for g, v in gi.get("measured", {}).items())
        header.append(f"'all' row: coalesce gap {gi.get('gap')} ({gi.get('method', '')}{': ' + meas if meas else ''})")
    print("\n".join(header))
    for label, b in budgets.items():
        print(f"\n## DRAM budget {label}: {b / 1e6:.1f} MB ({b / total:.0%} of the model) for the flash rows, "
              f"everything included; naive and hybrid hold weights up to {base[label] / 1e6:.1f} MB "
              f"({base[label] / total:.0%}), plus one streamed layer, KV cache and working memory\n")
        print(table(summary, label))
        for a in summary.values():
            if a.get("budget_label") == label and a["fits"] and a.get("within_budget") is False:
                print(f"note: {a['label']} peaked at {a['peak_bytes'] / 1e6:.1f} MB, over the budget")
        for line in targets(summary, label):
            print(f"- {line}")
    if probe:
        print(f"\nprobe: direct random reads of {probe['file']} at each row's mean read size, {args.threads} threads, "
              f"{probe['bytes_per_point'] / 2**20:.0f} MiB per point: " + ", ".join(
                  f"{p['chunk'] / 1024:.1f} KiB {p['gb_per_s']:.2f} GB/s" for p in probe["points"]))
    print("\ncolumns: MB read/token = bytes the row's reads fetched (logical); disk MB/token = /proc/self/io "
          "read_bytes; of probe = achieved GB/s against random direct reads of the row's mean read size at its "
          "thread count (hybrid reads sequentially, so it can pass 100%); compute = attention + FFN + the rest; "
          "peak MB = MLX's peak + ffn.bundles pages in the page cache (naive: with the kernel's async readahead); "
          "agreement = greedy next-token agreement with dense; ppl = perplexity of the text's next tokens")

    result = {"model": str(s.folder), "model_bytes": total, "budgets": budgets, "baseline_budgets": base, "rows": rows,
              "prompt_tokens": s.prompt_tokens, "gen_tokens": s.gen_tokens, "repeats": args.repeats,
              "threads": args.threads, "verify": args.verify, "eviction": eviction, "cgroup": res.get("cgroup"),
              "baseline_rss_bytes": baseline_rss, "coalescing": gi, "probe": probe,
              "summary": summary, "runs": res["runs"], "seconds": time.time() - t_start,
              "targets": {l: targets(summary, l) for l in budgets}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plots:
        d = Path(args.plots)
        d.mkdir(parents=True, exist_ok=True)
        for i, (label, b) in enumerate(budgets.items()):
            name = "latency_breakdown.png" if len(budgets) == 1 else f"latency_breakdown_{i}.png"
            plot_breakdown(summary, label, d / name,
                           f"{s.folder.name}: ms per token at budget {label} ({b / total:.0%}) (paper Fig. 1)")
        if len(budgets) > 1:
            plot_sweep(summary, budgets, total, d / "latency_vs_budget.png")
    return result


if __name__ == "__main__":
    main()
