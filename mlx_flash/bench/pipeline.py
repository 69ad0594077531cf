"""Pipeline mode: two ranks on this machine, each in its own memory cgroup at half the budget, against one
rank at the whole budget and naive mmap at the same total (synthetic model, as same-budget mode).

    python -m mlx_flash.bench.pipeline [--geometry opt-6.7b] [--layers 16] [--share 0.7] [--tokens 4]
        [--settle 5] [--prompt-tokens 4] [--ranks 2] [--no-cgroup] [--json out.json]

The model is same-budget mode's synthetic one (bench.synthetic: the layout `convert --quantize 4`
writes, random weights, the ActivationProcess's neuron sets named by predictors whose low-rank product
is computed), split per rank with mlx_flash.split. The budget B is --share of the model:
  - naive@B and all@B: `bench --same-budget ... --rows naive,all --cgroup` on the same folder, one
    process at B (naive mmap and flash without prefetch: the pipeline ranks have no lookahead either);
  - pipeline: mlx_flash.launch starts the ranks; each joins its own memory cgroup whose limit is B / N
    plus what it had used after its imports plus --cgroup-slack, plans flash mode at B / N for its own
    layers, and runs the same prompt and tokens (each rank steps the same activation process, so
    the ranks read what one process would);
  - one process at B / N: its plan, refused when the model's resident part alone exceeds it.
(--no-cgroup: no cgroups, the peaks are MLX's: the tests' quick run.) At 0.6, OPT-6.7B's geometry does
not fit B / 2 per rank: each rank's resident part, 423 MB, plus a prompt's numpy working memory.
Per decode token, median-free (one run, --tokens timed after --settle untimed): each rank's compute,
exposed I/O, memory management and send time, its waits, bytes sent; "passing" is the token's time
minus the ranks' busy times (activations, the token's all_sum, and the scheduling around them).
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

import numpy as np

from ..errors import FlashError, cli
from ..sizes import parse_budget, parse_size
from .synthetic import GEOMETRIES

DEFAULTS = {"geometry": "opt-6.7b", "layers": 16, "share": "0.7", "tokens": 4, "settle": 5, "prompt_tokens": 4}
TARGET_PASSING = 0.05  # of the token, at OPT-6.7B's geometry on localhost


class RankPredictor:
    """bench.synthetic.SyntheticPredictor for one rank: its first layer steps the activation process."""

    @staticmethod
    def make(layer: int, first: int, sets, d_model: int, rank: int):
        from .synthetic import SyntheticPredictor

        class Stepping(SyntheticPredictor):
            def __call__(self, x):
                if self.layer == first and self.layer != 0:
                    self._sets.step(x.shape[0])
                return super().__call__(x)

        return Stepping(layer, sets, d_model, rank)


def join_cgroup(cg: Path, budget: int, slack: int) -> int:
    """Move this process into `cg` and limit it to budget + its usage so far + slack; returns that usage."""
    (cg / "cgroup.procs").write_text(str(os.getpid()))
    base = int((cg / "memory.usage_in_bytes").read_text())
    (cg / "memory.limit_in_bytes").write_text(str(budget + base + slack))
    return base


def waiting_cpu(link, mx, seconds: float = 1.0) -> float:
    """CPU seconds per second that rank 0 spends waiting in a receive while rank 1 sleeps (the ring backend
    polls: on one machine a waiting rank takes that much of a core from the one computing)."""
    x = mx.zeros((1,), mx.float32)
    used = 0.0
    if link.rank == 1:
        time.sleep(seconds)
        mx.eval(mx.distributed.send(x, 0))
    elif link.rank == 0:
        t, c = time.perf_counter(), time.process_time()
        mx.eval(mx.distributed.recv_like(x, 1))
        used = (time.process_time() - c) / (time.perf_counter() - t)
    return used


def rank_main(args):
    """One rank, started by mlx_flash.launch: its cgroup, its layers at its budget, the timed tokens."""
    import mlx.core as mx

    from .. import pipeline
    from ..flash.budget import model_bytes
    from ..format import FlashConfig
    from .synthetic import PREDICTOR_RANK, ActiveSets

    rank = int(os.environ.get("MLX_RANK", "0"))
    cg = Path(args.rank_child.split(",")[rank]) if args.rank_child != "-" else None  # "-": --no-cgroup
    folder = Path(f"{args.dir}-rank{rank}-of-{args.ranks}")
    cfg = FlashConfig.load(folder)
    budget = parse_budget(args.share, model_bytes(args.dir, FlashConfig.load(args.dir))) // args.ranks
    base = join_cgroup(cg, budget, args.cgroup_slack) if cg else 0
    link = pipeline.start(600)
    polling = waiting_cpu(link, mx)
    start, end = cfg.pipeline["layers"]
    sets = ActiveSets(cfg.d_ff, cfg.pipeline["n_layers"], args.seed)
    rank_ = min(PREDICTOR_RANK, cfg.d_model // 8)
    preds = [RankPredictor.make(l, start, sets, cfg.d_model, rank_) for l in range(start, end)]
    loaded, failure = pipeline.attempt(lambda: pipeline.load_rank(
        folder, rank, args.ranks, "flash", dram_budget=budget, predictor=preds, threads=args.threads, prefetch=False,
        max_kv_size=args.prompt_tokens + args.settle + args.tokens + 1))  # the context, as bench.rows plans it
    pipeline.agree(link, failure)  # one line from the first rank whose plan refuses its budget
    model, cfg, _ = loaded
    pipeline.connect(model, cfg, link)
    ids = np.random.default_rng(args.seed).integers(0, cfg.model_config["vocab_size"], args.prompt_tokens).tolist()
    times, mark = [], None
    for n, _ in enumerate(pipeline.generate_tokens(model, ids, args.settle + args.tokens + 1, lambda lp: mx.argmax(lp, -1),
                                                   pipeline.prefill_chunk(model), link, (start, end))):
        times.append(time.perf_counter())
        if n == args.settle:  # the timed tokens start here
            model.flash_stats.reset()
            mark = (times[-1], link.recv_s, link.send_s, link.token_s, link.bytes_sent)
    waits = (link.recv_s - mark[1], link.send_s - mark[2], link.token_s - mark[3])
    row = pipeline.figures_row(model, link, (start, end), times[-1] - mark[0], args.tokens, waits,
                               link.bytes_sent - mark[4])
    peak = int((cg / "memory.max_usage_in_bytes").read_text()) - base if cg else mx.get_peak_memory()
    rows = link.gather(row + [peak / 1e6, mx.get_peak_memory() / 1e6, model.flash_stats.window_shrinks])
    if rank == 0:
        token_ms = 1000.0 * (times[-1] - mark[0]) / args.tokens
        Path(args.json).write_text(json.dumps({"rows": rows.tolist(), "token_ms": token_ms, "budget": budget,
                                               "waiting_cpu": polling}))


def single_rows(args, folder: Path) -> dict:
    """naive and flash at the whole budget in one process: same-budget mode's rows on the same folder."""
    out = Path(tempfile.mkdtemp(prefix="mlx-flash-pipeline-")) / "single.json"
    cmd = [sys.executable, "-m", "mlx_flash.bench", "--same-budget", args.geometry, "--layers", str(args.layers),
           "--share", args.share, "--rows", "naive,all", *(["--cgroup"] if args.cgroup else []), "--tokens",
           str(args.tokens), "--settle",
           str(args.settle), "--repeats", "1", "--prompt-tokens", str(args.prompt_tokens), "--dir", str(folder),
           "--json", str(out), "--quiet", "--threads", str(args.threads)]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if p.returncode != 0:
        raise FlashError(f"the single-machine rows failed: {' '.join(cmd)}")
    return json.loads(out.read_text())


def pipeline_rows(args, folder: Path) -> dict:
    from .cgroup import cgroup_root

    cgs = []
    for r in range(args.ranks if args.cgroup else 0):
        cgs.append(cgroup_root() / f"mlx-flash-pipeline-{os.getpid()}-rank{r}")
        cgs[-1].mkdir()
        (cgs[-1] / "memory.swappiness").write_text("0")
    out = Path(tempfile.mkdtemp(prefix="mlx-flash-pipeline-")) / "ranks.json"
    cmd = [sys.executable, "-m", "mlx_flash.launch", "--ranks", str(args.ranks), "--", "-m", "mlx_flash.bench.pipeline",
           "--geometry", args.geometry, "--layers", str(args.layers), "--share", args.share, "--tokens",
           str(args.tokens), "--settle", str(args.settle), "--prompt-tokens", str(args.prompt_tokens), "--dir",
           str(folder), "--json", str(out), "--threads", str(args.threads), "--seed", str(args.seed),
           "--cgroup-slack", str(args.cgroup_slack), "--rank-child", ",".join(map(str, cgs)) or "-"]
    try:
        p = subprocess.run(cmd, env={**os.environ, "MALLOC_ARENA_MAX": "2"}, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise FlashError(f"the pipeline's ranks failed (exit status {p.returncode}): see above")
        return json.loads(out.read_text())
    finally:
        for cg in cgs:
            try:
                cg.rmdir()
            except OSError:
                pass


def one_rank_at(folder: Path, budget: int, context: int) -> str:
    """One process's flash plan of the whole model at `budget`: the refusal, or what it would hold."""
    from ..flash.budget import plan
    from ..format import RESIDENT_FILE, FlashConfig

    cfg = FlashConfig.load(folder)
    resident = (folder / RESIDENT_FILE).stat().st_size
    try:
        pl = plan(folder, cfg, resident, 0, budget, max_kv_size=context)
        return f"fits: {pl.total / 1e6:.1f} MB planned"
    except FlashError as e:
        return f"refused: {e}"


def report(args, single: dict, ranks: dict, one: str, resident: int) -> dict:
    s = {k.split("@")[0]: v for k, v in single["summary"].items()}
    rows, token_ms = np.array(ranks["rows"]), ranks["token_ms"]
    budget = single["budget"]
    print(f"# mlx-flash pipeline mode: SYNTHETIC {args.geometry} geometry, {args.layers} layers, random weights "
          f"({args.dir}); load average {os.getloadavg()[0]:.1f}")
    print(f"model {single['model_bytes'] / 1e9:.3f} GB, resident part {resident / 1e9:.3f} GB; B = {args.share} of the "
          f"model = {budget / 1e9:.3f} GB; {args.ranks} ranks on localhost (ring backend), each in its own memory "
          f"cgroup at B/{args.ranks} = {ranks['budget'] / 1e9:.3f} GB; {args.tokens} timed tokens after {args.settle}")
    head = ["row", "budget GB", "MB read/token", "exposed I/O ms", "memory ms", "compute ms", "send ms",
            "waits ms (activations, token)", "bytes sent/token", "total ms/token", "cgroup peak GB", "fits"]
    # fits: the cgroup's peak within the limit (budget + slack), as same-budget mode's rows
    print("\n| " + " | ".join(head) + " |\n|" + " --- |" * len(head))
    for name in ("naive", "all"):
        a = s.get(name)
        if a is None or "ms_total" not in a:
            print(f"| {name}@B | {budget / 1e9:.3f} | does not fit: {a['reason'] if a else 'not run'} |")
            continue
        print(f"| {name}@B (1 process) | {budget / 1e9:.3f} | {a['bytes_read_per_token'] / 1e6:.1f} | "
              f"{a['ms_io_exposed']:.1f} | {a['ms_mem']:.1f} | {a['ms_compute']:.1f} | - | - | - | {a['ms_total']:.1f} | "
              f"{(a['peak_cgroup_bytes'] or 0) / 1e9:.3f} | {'yes' if a['fits'] else 'NO'} |")
    fits = []
    for r, row in enumerate(rows):
        a, b, busy, comp, io, mem, recv, send, tok, sent, read = row[:11]
        peak, mlx_peak = row[-3], row[-2]
        fit = peak * 1e6 <= ranks["budget"] + args.cgroup_slack
        fits.append(fit)
        print(f"| pipeline rank {r} (layers {int(a)}-{int(b) - 1}) | {ranks['budget'] / 1e9:.3f} | {read / 1e6:.1f} | "
              f"{io:.1f} | {mem:.1f} | {comp:.1f} | {send:.2f} | {recv:.1f}, {tok:.1f} | {sent:.0f} | busy {busy:.1f} | "
              f"{peak / 1e3:.3f} (MLX {mlx_peak / 1e3:.3f}) | {'yes' if fit else 'NO'} |")
    passing = token_ms - rows[:, 2].sum()
    print(f"| pipeline, {args.ranks} ranks | {args.ranks} x {ranks['budget'] / 1e9:.3f} | "
          f"{rows[:, 10].sum() / 1e6:.1f} | {rows[:, 4].sum():.1f} | {rows[:, 5].sum():.1f} | {rows[:, 3].sum():.1f} | "
          f"{rows[:, 7].sum():.2f} | passing {passing:.1f} | {rows[:, 9].sum():.0f} | {token_ms:.1f} | - | "
          f"{'yes' if all(fits) else 'NO'} |")
    print(f"\nwaiting costs CPU here: rank 0 used {ranks['waiting_cpu']:.2f} CPU-seconds per second while it waited "
          f"in a receive (the ring backend polls), on a machine whose {os.cpu_count()} cores the ranks share")
    print(f"one process at B/{args.ranks} ({ranks['budget'] / 1e9:.3f} GB): {one}")
    share = passing / token_ms
    targets = [f"passing activations and the token: {passing:.1f} of {token_ms:.1f} ms/token ({share:.1%}; target <= "
               f"{TARGET_PASSING:.0%}: {'met' if share <= TARGET_PASSING else 'MISSED'})",
               f"the model's resident part {resident / 1e9:.3f} GB > one rank's budget {ranks['budget'] / 1e9:.3f} GB, "
               f"and the {args.ranks} ranks run it within theirs: "
               f"{'met' if resident > ranks['budget'] and all(fits) else 'MISSED'}"]
    for t in targets:
        print(f"- {t}")
    return {"single": single["summary"], "ranks": ranks, "one_process_at_rank_budget": one, "resident_bytes": resident,
            "targets": targets, "load_average": os.getloadavg()[0], "args": vars(args)}


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Two ranks at half the budget against one at the whole budget and naive "
                                            "mmap (synthetic model, memory cgroups): see mlx_flash.bench.pipeline.")
    p.add_argument("--geometry", default=DEFAULTS["geometry"], help=f"one of {', '.join(GEOMETRIES)}")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    p.add_argument("--share", default=DEFAULTS["share"], help="the single machine's budget B: a share of the model")
    p.add_argument("--ranks", type=int, default=2, help="ranks, each at B / ranks")
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="timed decode tokens")
    p.add_argument("--settle", type=int, default=DEFAULTS["settle"], help="untimed decode tokens first")
    p.add_argument("--prompt-tokens", type=int, default=DEFAULTS["prompt_tokens"])
    p.add_argument("--threads", type=int, default=32, help="read threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cgroup", action=argparse.BooleanOptionalAction, default=True,
                   help="each row and rank in its own memory cgroup (default; needs root and cgroup v1); without: "
                        "the peaks are MLX's and naive's pages are evicted every layer, as same-budget mode does")
    p.add_argument("--cgroup-slack", type=parse_size, default=64 << 20,
                   help="bytes over budget + baseline in each limit (as same-budget mode's; default 64 MiB)")
    p.add_argument("--dir", default=None, help="the synthetic model's folder (default: same-budget mode's)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--rank-child", default=None, help=argparse.SUPPRESS)
    return p


@cli
def main(argv=None):
    from ..format import RESIDENT_FILE
    from ..models.in_out import default_layout
    from ..sources import models_dir
    from ..format import FlashConfig
    from ..load import is_flash_folder
    from ..split import split, split_id
    from .cgroup import cgroup_root
    from .synthetic import write_model

    args = setup_arg_parser().parse_args(argv)
    if args.rank_child:
        return rank_main(args)
    if args.geometry not in GEOMETRIES:
        raise FlashError(f"--geometry {args.geometry}: unknown (choose from {', '.join(GEOMETRIES)})")
    if args.tokens < 1 or args.settle < 0 or args.prompt_tokens < 2 or args.ranks < 2:
        raise FlashError("--tokens must be at least 1, --settle 0, --prompt-tokens 2 and --ranks 2")
    if args.cgroup:
        cgroup_root()  # a clear message where there is none
    g = GEOMETRIES[args.geometry]
    folder = Path(args.dir) if args.dir else models_dir() / f"synthetic-e2e-{g.name}-q4-L{args.layers}"
    args.dir = str(folder)
    write_model(folder, g, args.layers, 4, 64, args.seed, progress=True, resident_layout=default_layout())
    made = [Path(f"{folder}-rank{r}-of-{args.ranks}") for r in range(args.ranks)]
    sid = split_id(FlashConfig.load(folder), args.ranks)
    if not all(is_flash_folder(m) and (FlashConfig.load(m).pipeline or {}).get("split_id") == sid for m in made):
        for m in made:
            shutil.rmtree(m, ignore_errors=True)
        split(folder, args.ranks, quiet=True)
    single = single_rows(args, folder)
    ranks = pipeline_rows(args, folder)
    one = one_rank_at(folder, ranks["budget"], args.prompt_tokens + args.settle + args.tokens + 1)
    out = report(args, single, ranks, one, (folder / RESIDENT_FILE).stat().st_size)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
