"""Same-budget benchmark of a mixture of experts: naive mmap, the OS page cache, flash experts and flash
experts + lookahead, each run in its own memory cgroup whose limit is the budget (synthetic model).

    python -m mlx_flash.bench.moe --geometry qwen3-30b-a3b --layers 8 --share 0.3 [--reuse 0.4] [--recent 0.8]
        [--skew 1.5] [--hit 0.85] [--tokens 6] [--settle 12] [--repeats 3]
        [--rows naive,pagecache,flash,flash+lookahead] [--no-cgroup] [--json out.json]
        [--dir models/synthetic-moe-qwen3-30b-a3b-L8]
    python -m mlx_flash.bench.moe --rows prompt-groups,prompt-pass --prompt-tokens 128   (a prompt's two ways)

Synthetic, and only that (bench/moe_synthetic.py): the weights (random 4-bit, group 64, float16 scales) and
the routing. The
folder is what `convert` writes for a mixture of experts (flash.json, resident.safetensors, experts.bundles
with CRCs), loaded by the product (flash.expert_attach), run through mlx-lm's model class with real
compute. The geometry is the real model's (Qwen3-30B-A3B: d_model 2048, 128 experts of width 768, top 8;
gpt-oss-20b: d_model 2880, 32 experts of width 2880, top 4) with fewer layers (`--layers`) and the
vocabulary cut in the same proportion, so that the resident part's share of the model stays the full
model's.

Routing (`Routing`): every router still computes its logits, but the experts it picks are drawn per
token and MoE layer from a process whose locality the flags set: `--reuse` of a token's experts were
used by the previous token, `--recent` (previous token included) within the last 8 tokens, the rest
uniformly among the others. Defaults from published traces of Qwen3-30B-A3B (38-45% reused from the
previous token, ~80% within 8 tokens); the report gives the realized shares and the hit rate of an LRU
holding 40% of the experts (published: 90-95%). Lookahead (`--hit`): layer l's lookahead names each of
the next MoE layer's experts with probability --hit (published: layer l+1's router on layer l's input
names 81-89%), and as many wrong ones as it missed.

| row             | what holds the experts                                    | reads per token                |
| naive           | one MoE layer's experts at a time, through a memory map   | every expert of every layer    |
|                 | made cold                                                 |                                |
| pagecache       | the OS page cache (parallel buffered preads of the routed | the routed experts the kernel  |
|                 | experts, as flash-moe and llama.cpp's mmap do)            | has not kept                   |
| flash           | flash.expert_attach: expert slots, parallel direct reads  | routed experts not in a slot   |
| flash+lookahead | the same, the next MoE layer's experts read meanwhile     | the same, partly ahead         |

Every row's DRAM budget is `--share` of the model (resident part + every expert's content) and covers
everything its process allocates beyond its baseline (libraries, before any weight): with cgroups
(default; root, cgroup v1) each row and repetition runs in a child process in a memory cgroup of limit
budget + baseline + 64 MiB of slack, the kernel deciding what stays cached; `fits` reads the cgroup's peak.
Columns as the same-budget table: ms per token (median over every timed token of every repetition),
I/O, exposed I/O, memory management, compute (the rest: MLX and Python), experts read per token, hit
rate, read GB/s against the in-run probe (random direct reads of one extent, 8 and 32 threads), peak.

Prompt rows (not run by default; bench/moe_prompt.py): flash mode at the same budget, cold slots, one
prompt of `--prompt-tokens` tokens to its first logits, run as generate runs it: `prompt-groups` in groups
of tokens whose experts fit the slots (--prompt-mode window), `prompt-pass` as one pass over each layer's
experts (--prompt-mode pass, flash/expert_prompt.py).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import FlashError, cli
from ..expert_format import EXPERTS_FILE, ExpertStore
from ..format import PAGE, round_up
from ..models.architectures import architecture, moe_blocks
from ..sizes import parse_budget
from ..system import MappedBundles, direct_read_method, disk_read_bytes, drop_cache, open_direct
from .moe_prompt import PROMPT_ROWS, prompt_row, prompt_table, summarize_prompt
from .moe_synthetic import GEOMETRIES, RECENT_TOKENS, Routing, SyntheticLookahead, SyntheticRouter, write_model

ROWS = ("naive", "pagecache", "flash", "flash+lookahead")
FLASH_ROWS = ("flash", "flash+lookahead")
THREADS = 32
SLACK = 64 << 20  # cgroup limit beyond budget + baseline: Python objects and thread stacks, which no plan counts
CONTEXT = 64  # tokens of KV cache every row reserves
PROMPT_TOKENS = 4
TARGET_SPEEDUP = 3.0
FLASH_MOE = "flash-moe (C/Metal, M3 Max 48 GB): Qwen3.5-397B-A17B 4-bit (209 GB) at 4.36 tokens/s, parallel pread of " \
            "4 experts per layer through the OS page cache; speculative expert reads measured 18% slower there"

DEFAULTS = {"layers": 8, "share": 0.3, "reuse": 0.4, "recent": 0.8, "skew": 1.5, "hit": 0.85, "tokens": 6, "settle": 12,
            "repeats": 3, "prompt_tokens": 128}


# MARK: - the rows' expert providers beyond flash mode


class NaiveExperts(nn.Module):
    """Naive mmap: the layer's every expert through cold pages of a memory map, every token: touching a byte
    per page faults them in (I/O), their fields are copied into a buffer of every expert shared by the
    layers and the pages evicted (memory), then mlx-lm's SwitchGLU computes on the buffer."""

    def __init__(self, layer: int, glu, buffer, mapped: MappedBundles, store: ExpertStore, stats, first: bool):
        super().__init__()
        self.layer, self.glu, self.buffer, self.mapped = layer, glu, buffer, mapped
        self.stats, self.first = stats, first
        self.offset, self.experts = store.layers[layer]["offset"], store.num_experts
        self.nbytes, self.stride = store.num_experts * store.layout.stride, store.layout.stride
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        s = self.stats
        mx.eval(x, indices)  # the layers before: not this layer's I/O
        flat = self.mapped.np[self.offset : self.offset + self.nbytes]
        t0 = time.perf_counter()
        int(flat[::PAGE].max())  # one byte per page: the page faults (disk reads) happen here
        t1 = time.perf_counter()
        self.buffer.fill(slice(0, self.experts), flat.reshape(self.experts, self.stride))
        self.mapped.evict(self.offset, round_up(self.nbytes, PAGE))
        t2 = time.perf_counter()
        y = self.glu(x, indices)
        mx.eval(y)  # before the next layer refills the buffer
        if x.size == x.shape[-1]:  # decode
            s.decode_tokens += self.first
            s.io_s += t1 - t0
            s.io_exposed_s += t1 - t0
            s.memory_s += t2 - t1
            s.experts_read += self.experts
            s.bytes_read += self.nbytes
            s.needed += indices.size
        return y


def forget_slots(cache):
    """The page-cache row: the slots hold only this step's experts (every routed expert is read each
    token, through the OS page cache), so the ExpertCache's own caching is turned off."""
    step = cache.step

    def uncached(active):
        cache.slot_of[:] = -1
        cache.expert_in[:] = -1
        return step(active)

    cache.step = uncached


# MARK: - one row, one repetition (inside its cgroup)


def _cgroup_value(cg: Optional[Path], name: str) -> Optional[int]:
    return int((cg / name).read_text()) if cg is not None else None


def run_row(row: str, folder: Path, args, budget: int, cg: Optional[Path], seed: int) -> dict:
    """Load the row's model within `budget`, route with the synthetic process, time the decode tokens."""
    from mlx_lm.models.cache import make_prompt_cache

    from ..flash.attach import resident_facts
    from ..flash.bundle_reader import BundleBuffer
    from ..flash.expert_attach import load_experts, load_resident_moe, model_bytes, plan_experts, slot_glu
    from ..flash.experts import ExpertStats
    from ..flash.neuron_cache import NeuronBuffer

    mx.set_cache_limit(0)  # freed buffers go back to the OS: memory figures are what is live
    base = _cgroup_value(cg, "memory.usage_in_bytes")
    if cg is not None:
        (cg / "memory.limit_in_bytes").write_text(str(budget + base + SLACK))
        (cg / "memory.max_usage_in_bytes").write_text("0")
    store = ExpertStore.load(folder)
    moe = architecture(store.model_config).moe
    total = model_bytes(folder, store)
    mapped = None
    if row in PROMPT_ROWS:
        model, _ = load_experts(folder, "flash", dram_budget=budget, threads=THREADS, verify=False,
                                max_kv_size=args.prompt_tokens + CONTEXT, prefill_step=args.prompt_tokens,
                                prompt_mode=PROMPT_ROWS[row])
        plan, stats, blocks = model.flash_plan.to_dict(), model.flash_stats, moe_blocks(model)
    elif row in FLASH_ROWS or row == "pagecache":
        opts = dict(dram_budget=budget, threads=THREADS, verify=False, max_kv_size=CONTEXT,
                    prefill_step=PROMPT_TOKENS, prefetch=row == "flash+lookahead")
        if row == "pagecache":  # a token's experts in top-k slots, the rest of the budget left to the kernel
            opts.update(slots=store.top_k, direct=False)
        model, _ = load_experts(folder, "flash", **opts)
        plan, stats = model.flash_plan.to_dict(), model.flash_stats
        blocks = moe_blocks(model)
        if row == "pagecache":
            for b in blocks.values():
                forget_slots(getattr(b, moe.switch).cache)
    else:
        model, blocks, switches = load_resident_moe(folder, store)
        resident, transient, item = resident_facts(model, [])
        # its one buffer of a whole layer stands where flash mode's slots are: planned as every expert's slot
        pl = plan_experts(store, total, resident, transient, item, budget=None, max_kv_size=CONTEXT,
                          prefill_step=PROMPT_TOKENS)
        pl.buffers //= len(blocks)
        plan = pl.to_dict()
        stats = ExpertStats(moe_layers=len(blocks), experts=store.num_experts, expert_bytes=store.layout.stride)
        staging = BundleBuffer(1, store.layout)
        buffer = NeuronBuffer(store.num_experts, store.layout, staging.np.reshape(-1))
        mapped = MappedBundles(folder / EXPERTS_FILE)
        for l, b in blocks.items():
            setattr(b, moe.switch, NaiveExperts(l, slot_glu(switches[l], buffer, store), buffer, mapped, store, stats,
                                                l == min(blocks)))
    layers = sorted(blocks)
    routing = Routing(layers, store.num_experts, store.top_k, args.reuse, args.recent, args.skew, seed)
    for i, l in enumerate(layers):
        blocks[l][moe.router] = SyntheticRouter(l, blocks[l][moe.router], routing, i == 0)
    if row == "flash+lookahead":
        for l, nxt in zip(layers, layers[1:]):
            blocks[l][moe.switch].lookahead = SyntheticLookahead(nxt, blocks[nxt][moe.router].router, routing,
                                                                 args.hit, seed)
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    if row in PROMPT_ROWS:
        res = prompt_row(model, cache, stats, store.model_config["vocab_size"], args, seed, plan["prefill_step"])
        model.flash_reader.close()
        peak_cg = _cgroup_value(cg, "memory.max_usage_in_bytes")
        return {"row": row, **res, "plan": plan, "peak_mlx_bytes": mx.get_peak_memory(),
                "peak_cgroup_bytes": None if cg is None else peak_cg - base, "routing": routing.summary()}
    ids = np.random.default_rng(seed).integers(0, store.model_config["vocab_size"], PROMPT_TOKENS + 1)
    mx.eval(model(mx.array(ids[:PROMPT_TOKENS])[None], cache=cache))
    token = mx.array([[int(ids[-1])]])
    settle = args.settle if row in FLASH_ROWS or row == "pagecache" else 0
    times, disk0 = [], None
    for t in range(settle + args.tokens):
        if t == settle:
            stats.reset()
            disk0 = disk_read_bytes()
        t0 = time.perf_counter()
        logits = model(token, cache=cache)
        mx.eval(logits)
        if t >= settle:
            times.append(1000 * (time.perf_counter() - t0))
        token = mx.argmax(logits[:, -1:], axis=-1)
    disk = disk_read_bytes() - disk0
    snap = stats.snapshot()
    if mapped is not None:
        mapped.close()
    reader = getattr(model, "flash_reader", None)
    if reader is not None:
        reader.close()
    peak_cg = _cgroup_value(cg, "memory.max_usage_in_bytes")
    return {"row": row, "ms_tokens": times, "stats": snap, "plan": plan, "disk_bytes_per_token": disk / args.tokens,
            "peak_mlx_bytes": mx.get_peak_memory(), "peak_cgroup_bytes": None if cg is None else peak_cg - base,
            "cgroup_failcnt": _cgroup_value(cg, "memory.failcnt"), "routing": routing.summary()}


# MARK: - the parent: the synthetic model, the probe, the rows in their cgroups


def probe(folder: Path, stride: int, threads: int, nbytes: int = 256 << 20) -> float:
    """GB/s of random direct reads of one extent from `threads` threads on experts.bundles (in this run)."""
    from concurrent.futures import ThreadPoolExecutor

    from .probe import probe_point

    fd = open_direct(folder / EXPERTS_FILE)
    try:
        with ThreadPoolExecutor(threads) as pool:
            size = os.fstat(fd).st_size
            return probe_point(fd, size, stride, threads, min(nbytes, size), pool)["gb_per_s"]
    finally:
        os.close(fd)


def lru_hit_rate(args, store: ExpertStore, share: float = 0.4, tokens: int = 400) -> float:
    """The hit rate of an LRU holding `share` of the experts under the routing process (the published
    traces' check: 90-95% at 40%)."""
    from ..flash.expert_cache import ExpertCache

    routing = Routing(store.moe_layers[:1], store.num_experts, store.top_k, args.reuse, args.recent, args.skew,
                      args.seed)
    cache = ExpertCache(store.num_experts, max(store.top_k, int(share * store.num_experts)))
    for _ in range(tokens):
        routing.advance(1)
        cache.step(routing.current[store.moe_layers[0]])
        cache.commit()
    return cache.stats.hits / cache.stats.needed


# the child joins its cgroup first, so that everything it allocates is charged there
_CHILD = """
import os, sys
if sys.argv[1] != "-":
    open(os.path.join(sys.argv[1], "cgroup.procs"), "w").write(str(os.getpid()))
    os.environ["MLX_FLASH_CGROUP"] = sys.argv[1]
from mlx_flash.bench.moe import main
main(sys.argv[2:])
"""


def spawn_row(row: str, args, folder: Path, budget: int, seed: int, cgroup: bool) -> dict:
    """One row, one repetition, in a child process (in a fresh memory cgroup with `cgroup`)."""
    from .cgroup import make_cgroup

    drop_cache(folder / EXPERTS_FILE)  # every row starts from a cold disk
    cg = make_cgroup() if cgroup else None
    out = Path(tempfile.mkdtemp(prefix="mlx-flash-moe-")) / "row.json"
    argv = [str(cg) if cg else "-", "--child-row", row, "--geometry", args.geometry, "--dir", str(folder),
            "--child-budget", str(budget), "--seed", str(seed), "--json", str(out)]
    argv += [f"--{k.replace('_', '-')}={getattr(args, k)}"
             for k in ("reuse", "recent", "skew", "hit", "tokens", "settle", "prompt_tokens")]
    try:
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # no 64 MB malloc arena per read thread
        p = subprocess.run([sys.executable, "-c", _CHILD, *argv], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1].removeprefix("error: ")
            if p.returncode < 0:  # the kernel's OOM killer, in the cgroup
                why = f"killed by signal {-p.returncode}: it needed more memory than the budget"
            return {"row": row, "fits": False, "reason": why}
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
        if cg is not None:
            try:
                cg.rmdir()
            except OSError:
                pass


def summarize(runs: List[dict], budget: int, slack: int) -> dict:
    ok = [r for r in runs if "ms_tokens" in r]
    if not ok:
        return {"fits": False, "reason": runs[0].get("reason", "failed")}
    med = lambda f: float(np.median([f(r) for r in ok]))
    st = lambda name: med(lambda r: r["stats"][name] or 0.0)
    total = float(np.median([t for r in ok for t in r["ms_tokens"]]))
    s = {"ms_total": total, "ms_io": st("ms_io"), "ms_io_exposed": st("ms_io_exposed"), "ms_mem": st("ms_memory"),
         "experts_read_per_token": st("experts_read_per_token"), "mb_read_per_token": st("mb_read_per_token"),
         "disk_mb_per_token": med(lambda r: r["disk_bytes_per_token"]) / 1e6,
         "hit_rate": med(lambda r: r["stats"]["expert_hit_rate"] or 0.0),
         # the page cache's hits: the share of the bytes read that did not come from the disk (0 where the
         # kernel's readahead read more from the disk than was asked for: the disk MB column shows it)
         "page_cache_hit_rate": med(lambda r: max(0.0, 1 - r["disk_bytes_per_token"]
                                                  / max(r["stats"]["bytes_read_per_token"], 1))),
         "prefetch_hit_rate": med(lambda r: r["stats"]["prefetch_hit_rate"] or 0.0),
         "prefetch_wasted_mb_per_token": st("prefetch_wasted_mb_per_token"),
         "read_gb_per_s": st("read_gb_per_s"), "planned_bytes": ok[0]["plan"]["total"],
         "peak_mlx_bytes": max(r["peak_mlx_bytes"] for r in ok),
         "peak_cgroup_bytes": None if ok[0]["peak_cgroup_bytes"] is None else max(r["peak_cgroup_bytes"] for r in ok),
         "ms_per_token_runs": [float(np.median(r["ms_tokens"])) for r in ok], "repeats": len(ok),
         "routing": ok[0]["routing"]}
    s["ms_compute"] = total - s["ms_io_exposed"] - s["ms_mem"]  # the rest: MLX's compute and Python
    peak = s["peak_cgroup_bytes"] if s["peak_cgroup_bytes"] is not None else s["peak_mlx_bytes"]
    s["fits"] = len(ok) == len(runs) and s["planned_bytes"] <= budget and \
        peak <= budget + (slack if s["peak_cgroup_bytes"] is not None else 0)
    return s


def measure(args) -> dict:
    folder = Path(args.dir or f"models/synthetic-moe-{args.geometry}-L{args.layers}")
    if not (folder / "flash.json").is_file():
        print(f"writing the synthetic model to {folder} (once) ...", file=sys.stderr)
        write_model(folder, args.geometry, args.layers, args.seed, quiet=args.quiet)
    store = ExpertStore.load(folder)
    from ..flash.expert_attach import model_bytes

    total = model_bytes(folder, store)
    budget = parse_budget(args.share, total)
    if args.cgroup:
        from .cgroup import cgroup_root

        cgroup_root()  # refuses, in one line, where there is no cgroup v1
    probes = {t: probe(folder, store.layout.stride, t) for t in (store.top_k, THREADS)}
    runs = {row: [] for row in args.rows}
    for rep in range(args.repeats):  # interleaved: each repetition runs every row once
        for row in args.rows:
            if not args.quiet:
                print(f"{row}, repetition {rep + 1} of {args.repeats} ...", file=sys.stderr)
            runs[row].append(spawn_row(row, args, folder, budget, args.seed + rep, args.cgroup))
    summary = {row: (summarize_prompt if row in PROMPT_ROWS else summarize)(r, budget, SLACK)
               for row, r in runs.items()}
    naive = summary.get("naive")
    for s in summary.values():
        if naive and naive.get("fits") and s.get("fits") and "ms_total" in s:
            s["speedup_vs_naive"] = naive["ms_total"] / s["ms_total"]
    return {"geometry": args.geometry, "layers": store.model_config["num_hidden_layers"], "folder": str(folder),
            "model_bytes": total, "budget": budget, "share": args.share, "experts": store.num_experts,
            "top_k": store.top_k, "expert_bytes": store.layout.stride, "probe_gb_per_s": probes,
            "reuse": args.reuse, "recent": args.recent, "skew": args.skew, "hit": args.hit,
            "lru_40_hit_rate": lru_hit_rate(args, store),
            "cgroup": args.cgroup, "tokens": args.tokens, "settle": args.settle, "repeats": args.repeats,
            "prompt_tokens": args.prompt_tokens,
            "summary": summary, "runs": runs}


def report(out: dict) -> str:
    gb = lambda v: "-" if v is None else f"{v / 1e9:.3f}"
    first = next((s for s in out["summary"].values() if "routing" in s), None)
    realized = first["routing"] if first else {}
    lines = [f"# mlx-flash MoE same-budget: SYNTHETIC {out['geometry']} geometry, {out['layers']} layers, random "
             f"4-bit weights ({out['folder']}); {out['experts']} experts of {out['expert_bytes'] / 1e6:.2f} MB, top "
             f"{out['top_k']}; model {out['model_bytes'] / 1e9:.3f} GB; every row's budget {out['share']} of it = "
             f"{out['budget'] / 1e9:.3f} GB",
             f"routing: SYNTHETIC, --reuse {out['reuse']} --recent {out['recent']} --skew {out['skew']} (realized: "
             f"{realized.get('from_previous', 0):.0%} from the previous token, "
             f"{realized.get('within_8', 0):.0%} within 8 tokens; an LRU of 40% of the experts hits "
             f"{out['lru_40_hit_rate']:.0%}); lookahead --hit {out['hit']}",
             f"{out['tokens']} timed tokens x {out['repeats']} interleaved repetitions per row "
             f"(+{out['settle']} untimed in pagecache and flash rows), medians; reads: {direct_read_method()} "
             f"(flash), buffered pread (pagecache), cold mmap (naive); "
             + (f"one memory cgroup per row and repetition, limit budget + baseline + {SLACK >> 20} MiB"
                if out["cgroup"] else "no cgroup"),
             "in-run probe, random direct reads of one extent: " + ", ".join(
                 f"{t} threads {g:.2f} GB/s" for t, g in out["probe_gb_per_s"].items()), ""]
    head = ["row (synthetic)", "ms/token", "vs naive", "I/O ms", "exposed I/O ms", "memory ms", "compute ms",
            "experts read/token", "hit rate", "MB read/token", "disk MB/token", "read GB/s", "prefetch hit",
            "wasted MB/token", "planned GB", "peak GB", "fits"]
    decode = {row: s for row, s in out["summary"].items() if row not in PROMPT_ROWS}
    if decode:
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row, s in decode.items():
        if "ms_total" not in s:
            lines.append(f"| {row} | does not fit: {s['reason']} |")
            continue
        peak = s["peak_cgroup_bytes"] if s["peak_cgroup_bytes"] is not None else s["peak_mlx_bytes"]
        flash = row in FLASH_ROWS
        cells = [row, f"{s['ms_total']:.0f}", f"{s['speedup_vs_naive']:.2f}x" if s.get("speedup_vs_naive") else "-",
                 f"{s['ms_io']:.1f}", f"{s['ms_io_exposed']:.1f}", f"{s['ms_mem']:.1f}", f"{s['ms_compute']:.0f}",
                 f"{s['experts_read_per_token']:.1f}", f"{s['hit_rate']:.2f}" if flash else
                 f"{s['page_cache_hit_rate']:.2f} (page cache)" if row == "pagecache" else "-",
                 f"{s['mb_read_per_token']:.1f}", f"{s['disk_mb_per_token']:.1f}", f"{s['read_gb_per_s']:.2f}",
                 f"{s['prefetch_hit_rate']:.2f}" if row == "flash+lookahead" else "-",
                 f"{s['prefetch_wasted_mb_per_token']:.1f}" if row == "flash+lookahead" else "-",
                 gb(s["planned_bytes"]), gb(peak), "yes" if s["fits"] else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += prompt_table(out)
    lines += ["", f"beside: {FLASH_MOE} (their machine, not this one)"]
    return "\n".join(lines)


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Same-budget benchmark of a synthetic mixture of experts.")
    p.add_argument("--geometry", choices=list(GEOMETRIES), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"], help="layers of the synthetic model")
    p.add_argument("--share", default=str(DEFAULTS["share"]), help="every row's DRAM budget, a share of the model")
    p.add_argument("--reuse", type=float, default=DEFAULTS["reuse"],
                   help="share of a token's experts that the previous token used")
    p.add_argument("--recent", type=float, default=DEFAULTS["recent"],
                   help=f"share of a token's experts used within the last {RECENT_TOKENS} tokens (>= --reuse)")
    p.add_argument("--skew", type=float, default=DEFAULTS["skew"],
                   help="popularity of the experts drawn beyond the recent ones: p ~ 1 / rank^skew (0: uniform)")
    p.add_argument("--hit", type=float, default=DEFAULTS["hit"],
                   help="share of the next layer's experts the lookahead names")
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="timed decode tokens per repetition")
    p.add_argument("--settle", type=int, default=DEFAULTS["settle"], help="untimed tokens first (slots fill)")
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS + tuple(PROMPT_ROWS))}")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"],
                   help="the prompt rows' prompt length")
    p.add_argument("--cgroup", action=argparse.BooleanOptionalAction, default=True,
                   help="each row in its own memory cgroup (root, cgroup v1)")
    p.add_argument("--dir", default=None, help="the synthetic model's folder (written once)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--child-row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-budget", type=int, default=None, help=argparse.SUPPRESS)
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.child_row:  # inside the row's cgroup (spawn_row)
        cg = Path(os.environ["MLX_FLASH_CGROUP"]) if os.environ.get("MLX_FLASH_CGROUP") else None
        res = run_row(args.child_row, Path(args.dir), args, args.child_budget, cg, args.seed)
        Path(args.json).write_text(json.dumps(res))
        return
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in args.rows if r not in ROWS and r not in PROMPT_ROWS]
    if bad or not args.rows:
        raise FlashError(f"--rows: unknown row {bad[0] if bad else ''!r} (choose from "
                         f"{', '.join(ROWS + tuple(PROMPT_ROWS))})")
    if args.prompt_tokens < 2:
        raise FlashError("--prompt-tokens must be at least 2")
    if not 0 <= args.reuse <= args.recent <= 1 or not 0 <= args.hit <= 1:
        raise FlashError("--reuse, --recent and --hit must be shares, with --reuse <= --recent")
    if args.layers < 2 or args.tokens < 1 or args.repeats < 1 or args.settle < 0:
        raise FlashError("--layers must be at least 2, --tokens and --repeats at least 1, --settle at least 0")
    out = measure(args)
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
