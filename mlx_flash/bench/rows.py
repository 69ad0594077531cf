"""The rows of the benchmark: one model object, one token sequence, only the FFN provider differs.

Every row runs the same token sequence (held-out text: a prompt, then decode steps
fed the text's next token) through the same model object (models/ffn.py's contract):

| row        | in DRAM                                              | read per token                          |
| dense      | everything (upper bound; only where it fits)         | nothing                                 |
| naive      | attention, embeddings + whole FFN layers up to half  | other layers, through a cold memory map |
| hybrid     | the same                                             | other layers, large direct reads        |
| predictor  | attention, embeddings, predictors, one token's rows  | every predicted neuron, every token     |
| windowing  | + the neuron window                                  | only neurons new to the window          |
| all        | the same                                             | the same, reads coalesced over gaps     |

"Half" is the baselines' share of the weights; the flash rows hold everything, KV
cache and working memory included, within the DRAM budget (`flash.budget.plan`),
which may be the smallest budget their plan accepts (`min_flash_budget`).

Repetitions are interleaved (rep 1 of every row, then rep 2, ...) after one untimed
warm-up per row (`run_all`). Per decode token `run_once` measures I/O (page faults or
direct reads), memory management (copies, evictions, window bookkeeping), prediction,
compute (attention, FFN, the rest), peak memory, and quality against the dense row:
greedy next-token agreement and perplexity on the same text.
"""

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..baselines import DEFAULT_SHARE, attach_baseline, attach_dense_timed
from ..errors import FlashError
from ..flash.attach import attach_flash, resident_facts, smallest_budget, trained_predictors
from ..flash.budget import DEFAULT_PREFILL_STEP, DEFAULT_THREADS, model_bytes
from ..flash.neuron_cache import NeuronCache
from ..format import FlashConfig
from ..load import is_flash_folder, load_resident
from ..sizes import parse_budget
from ..system import disk_read_bytes, mem_available

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
GAP_CANDIDATES = (0, 1, 2, 4, 8, 16)
PHASES = ("io", "memory", "predict", "attention", "ffn", "other")
PHASE_LABELS = {"io": "I/O (reads, page faults)", "memory": "memory management", "predict": "prediction",
                "attention": "attention & rest of layer", "ffn": "FFN compute", "other": "LM head, sampling, Python"}
# --quick: a first look in seconds (tests, notebooks)
QUICK = {"prompt_tokens": 8, "gen_tokens": 4, "repeats": 1, "gap_candidates": "0,4", "gap_tokens": 2,
         "probe_bytes": str(1 << 20)}


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


# MARK: - one row, one pass


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
    flash_options: Optional[object] = None  # row -> extra attach_flash arguments (bench.same_budget: its predictors)
    settle_tokens: int = 0  # flash rows: decode tokens run before measuring, while the windows fill

    @property
    def context(self) -> int:
        """The KV cache every row reserves: the whole sequence."""
        return self.prompt_tokens + self.settle_tokens + self.gen_tokens + 1


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


def min_flash_budget(s: Setup) -> int:
    """The smallest budget flash mode's plan accepts (bisection over flash.attach.plan_flash)."""
    clear(s)
    predictors, _ = trained_predictors(s.folder, s.cfg, s.recall)
    return smallest_budget(s.model, s.folder, s.cfg, s.down_bias, predictors, s.window, s.context, s.recall)


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
        res = resident_facts(s.model, s.down_bias)[0]
        return Row(a.stats, {"budget": None}, res, a.close)
    if row in ("naive", "hybrid"):
        a = attach_baseline(s.model, s.folder, cfg, s.down_bias, "mmap" if row == "naive" else "hybrid",
                            weights_budget=budget, max_kv_size=s.context, threads=s.threads, verify=s.verify,
                            evict=s.evict)
        return Row(a.stats, a.plan.to_dict(), a.plan.weights_in_memory, a.close, a.map_stats)
    if cfg.predictors is None:
        raise FlashError(f"{s.folder} has no predictors: run python -m mlx_flash.train_predictors --model {s.folder}")
    extra = {"profile": True, **(s.flash_options(row) if s.flash_options else {})}
    attach_flash(s.model, s.folder, cfg, s.down_bias, dram_budget=budget, window=1 if row == "predictor" else s.window,
                 threads=s.threads, verify=s.verify, max_kv_size=s.context, recall=s.recall, **extra)
    pl = s.model.flash_plan
    caches = []
    for layer in s.model.layers:
        f = layer.mlp
        if row == "predictor":
            f.cache = NoReuseCache(cfg.d_ff, f.cache.slots, 1, buffer=f.buffer)
        elif row == "all":
            f.cache = NeuronCache(cfg.d_ff, f.cache.slots, pl.window, buffer=f.buffer, coalesce_gap=gap)
        caches.append(f.cache)
    reader = s.model.flash_reader
    return Row(s.model.flash_stats, {**pl.to_dict(), "coalesce_gap": gap if row == "all" else 0},
               pl.resident + pl.predictors + pl.staging + pl.buffers, reader.close, caches=caches)


def key(row: str, budget_label: str) -> str:
    return f"{row}@{budget_label}"


def run_once(s: Setup, row: str, budget: int, gap: int = 0, prompt_tokens=None, gen_tokens=None) -> dict:
    """One pass of the token sequence through one row; per decode token figures."""
    from mlx_lm.models.cache import make_prompt_cache

    P = prompt_tokens or s.prompt_tokens
    G = gen_tokens or s.gen_tokens
    if s.cgroup is not None:
        (s.cgroup / "memory.limit_in_bytes").write_text("-1")  # the previous row's limit goes
    try:
        r = attach_row(s, row, budget, gap)
    except FlashError as e:
        clear(s)
        return {"row": row, "fits": False, "reason": str(e)}
    if s.cgroup is not None and row != "dense":
        # flash rows: their budget; baselines: what they were planned to hold (weights + one layer + KV + working)
        limit = (r.plan["total"] if row in ("naive", "hybrid") else budget) + s.baseline + s.slack
        try:
            (s.cgroup / "memory.limit_in_bytes").write_text(str(limit))
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
            (s.cgroup / "memory.max_usage_in_bytes").write_text("0")
        cache = make_prompt_cache(s.model)
        t0 = time.perf_counter()
        for i in range(0, P, DEFAULT_PREFILL_STEP):  # like mlx-lm: in chunks, the prompt's logits never computed
            s.model(mx.array(ids[i : min(i + DEFAULT_PREFILL_STEP, P)])[None], cache=cache)
            mx.eval([c.state for c in cache])
        caches = r.caches or []
        settle = s.settle_tokens if caches else 0
        for t in range(settle):  # untimed: the windows fill (the prompt was one window step per chunk)
            mx.eval(s.model(mx.array(ids[P + t : P + t + 1])[None], cache=cache))
        if settle:
            r.stats.reset()
        P += settle
        prefill_s = time.perf_counter() - t0
        disk0 = disk_read_bytes()
        new0 = sum(c.stats.new_neurons - c.stats.filled for c in caches)
        fill0 = sum(c.stats.filled for c in caches)
        times, argmax, nll = [], [], []
        for t in range(G):
            bk0 = r.map_stats.bookkeeping_s if r.map_stats is not None else 0.0
            t0 = time.perf_counter()
            logits = s.model(mx.array(ids[P + t : P + t + 1])[None], cache=cache)[0, -1]
            lp = logits - mx.logsumexp(logits)
            mx.eval(lp)
            bk = (r.map_stats.bookkeeping_s - bk0) if r.map_stats is not None else 0.0
            times.append(time.perf_counter() - t0 - bk)  # the naive row's mincore checks are the benchmark's
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
            out["peak_cgroup_bytes"] = int((s.cgroup / "memory.max_usage_in_bytes").read_text()) - s.baseline
            out["cgroup_failcnt"] = int((s.cgroup / "memory.failcnt").read_text())
        if r.map_stats is not None:
            for k in ("major_faults", "warm_bytes", "evicted_bytes", "stayed_cached_bytes"):
                out[f"{k}_per_token"] = getattr(r.map_stats, k) / G
        if caches:  # what the windows asked for during decode, and the gap fillers on top
            out["new_bundles_per_token"] = (sum(c.stats.new_neurons - c.stats.filled for c in caches)
                                            - new0) / G
            out["filled_bundles_per_token"] = (sum(c.stats.filled for c in caches) - fill0) / G
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


# MARK: - every row, interleaved


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
