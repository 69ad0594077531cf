"""What the disk can do, and what windowing saves: the paper's Figures 2b and 4, measured here.

    python -m mlx_flash.probe disk --model models/smollm2-135m [--chunks 4K:4M] [--threads 1,2,4,8,16,32]
        [--bytes 32M] [--scratch FILE] [--json out.json] [--plots DIR]
    python -m mlx_flash.probe window --model models/smollm2-135m [--windows 1:10] [--tokens 512]
        [--source predicted|active] [--json out.json] [--plots DIR]

disk (Figure 2b): random-read throughput against chunk size and thread count,
with direct I/O (O_DIRECT / F_NOCACHE) on the disk that holds the model, read
the way BundleReader reads (a ThreadPoolExecutor, os.preadv into aligned
buffers), so the two are comparable. The file read is the model's own
`ffn.bundles` when it is at least --scratch-size, else a scratch file of that
size written once next to the model (`.probe-scratch`). Every point reads the
same number of bytes at random offsets aligned to 4 KiB (to the disk's block
for chunks that are not whole pages, like single bundles).

window (Figure 4): per window size k, the share of the FFN read per token (the
neurons new to the window) and the share held in DRAM (the window's union),
from real activations: the model runs densely over held-out text and each
layer's predicted set (the trained predictors) or true active set (the
calibrated thresholds) goes through a NeuronCache without buffers.
"""

import argparse
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np

from ..flash.bundle_reader import _open_direct, logical_block_size
from ..errors import FlashError, cli
from ..format import BUNDLES_FILE, PAGE

DEFAULT_CHUNKS = "4K:4M"  # powers of two between
DEFAULT_THREADS = "1,2,4,8,16,32"
DEFAULT_BYTES = 32 << 20  # read per point
SCRATCH_SIZE = 256 << 20
SCRATCH_NAME = ".probe-scratch"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4K', '1.5M', '512' -> bytes (binary units)."""
    t = str(text).strip().upper().rstrip("B").rstrip("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise FlashError(f"'{text}' is not a size (e.g. 4K, 1M, 512)")


def parse_range(text: str, size: bool = False) -> List[int]:
    """'4K:4M' -> powers of two from 4K to 4M; '1,2,8' -> [1, 2, 8]; '1:10' -> 1..10 (counts)."""
    conv = parse_size if size else int
    try:
        if ":" in text:
            lo, hi = (conv(x) for x in text.split(":", 1))
            if size:
                out, v = [], lo
                while v <= hi:
                    out.append(v)
                    v *= 2
                return out
            return list(range(lo, hi + 1))
        return [conv(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlashError(f"'{text}' is not a list (a,b,c) or a range (lo:hi)")


# MARK: - disk probe (Figure 2b)


def scratch_file(folder: Path, size: int = SCRATCH_SIZE, path: Optional[Path] = None) -> Path:
    """The model's ffn.bundles when large enough, else a scratch file of random bytes beside it (kept)."""
    folder = Path(folder)
    bundles = folder / BUNDLES_FILE
    if path is None and bundles.is_file() and bundles.stat().st_size >= size:
        return bundles
    path = Path(path) if path is not None else folder / SCRATCH_NAME
    if path.is_file() and path.stat().st_size >= size:
        return path
    rng = np.random.default_rng(0)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for off in range(0, size, 8 << 20):
                f.write(rng.bytes(min(8 << 20, size - off)))  # random: nothing for the disk to compress
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise FlashError(f"cannot write the probe's scratch file {path}: {e.strerror}")
    return path


def _read_all(fd: int, buf: mmap.mmap, offsets: np.ndarray) -> int:
    """Worker: read len(buf) bytes at each offset (full reads, short ones continued)."""
    n = len(buf)
    mv = memoryview(buf)
    for off in offsets.tolist():
        done = 0
        while done < n:
            got = os.preadv(fd, [mv[done:]], off + done)
            if got <= 0:
                raise FlashError(f"probe read failed at offset {off + done}")
            done += got
    return len(offsets)


def probe_point(fd: int, file_size: int, chunk: int, threads: int, nbytes: int, pool: ThreadPoolExecutor,
                block: int = 512, seed: int = 0) -> dict:
    """Random reads of `chunk` bytes from `threads` threads until `nbytes` are read; returns GB/s."""
    align = PAGE if chunk % PAGE == 0 else block  # bundles are block-aligned, pages page-aligned
    slots = (file_size - chunk) // align + 1
    if slots < 1:
        raise FlashError(f"the probe file ({file_size} bytes) is smaller than a {chunk}-byte chunk")
    reads = max(threads, nbytes // chunk)
    rng = np.random.default_rng(seed + chunk * 131 + threads)
    offsets = rng.integers(0, slots, reads, dtype=np.int64) * align
    parts = np.array_split(offsets, threads)
    bufs = [mmap.mmap(-1, chunk) for _ in range(threads)]  # page-aligned, one per thread
    try:
        t0 = time.perf_counter()
        futures = [pool.submit(_read_all, fd, b, p) for b, p in zip(bufs, parts)]
        done = sum(f.result() for f in futures)
        dt = time.perf_counter() - t0
    finally:
        for b in bufs:
            b.close()
    return {"chunk": chunk, "threads": threads, "reads": done, "bytes": done * chunk, "seconds": dt,
            "gb_per_s": done * chunk / dt / 1e9, "iops": done / dt}


def probe_disk(path: Path, chunks: Iterable[int], threads: Iterable[int], nbytes: int = DEFAULT_BYTES,
               progress: bool = False, rounds: int = 1) -> dict:
    """Every (chunk, threads) point on `path` with direct I/O, in `rounds` interleaved passes (each at
    fresh random offsets); a point's GB/s is the median. Returns {"file", "points": [...], ...}."""
    from tqdm import tqdm

    path = Path(path)
    block = logical_block_size(path)
    chunks, threads = sorted(set(chunks)), sorted(set(threads))
    for c in chunks:
        if c < block or c % block:
            raise FlashError(f"chunk size {c} is not a multiple of the disk's {block}-byte block")
    if min(threads) < 1:
        raise FlashError("thread counts must be at least 1")
    fd = _open_direct(path)
    size = os.fstat(fd).st_size
    grid = [(c, t) for t in threads for c in chunks]
    samples = {g: [] for g in grid}
    try:
        with ThreadPoolExecutor(max(threads), thread_name_prefix="probe") as pool:
            bar = tqdm(total=len(grid) * rounds, desc="disk probe", unit="point", disable=not progress)
            for r in range(rounds):
                for c, t in grid:
                    samples[(c, t)].append(probe_point(fd, size, c, t, nbytes, pool, block, seed=r))
                    bar.update(1)
            bar.close()
    finally:
        os.close(fd)
    points = []
    for (c, t), ps in samples.items():
        p = dict(sorted(ps, key=lambda q: q["gb_per_s"])[len(ps) // 2])  # the median pass
        p["rounds_gb_per_s"] = [q["gb_per_s"] for q in ps]
        points.append(p)
    return {"file": str(path), "file_bytes": size, "block": block, "bytes_per_point": nbytes, "rounds": rounds,
            "method": "O_DIRECT/F_NOCACHE, random offsets aligned to 4 KiB (to the disk's block for chunks that "
                      "are not whole pages), ThreadPoolExecutor + os.preadv into page-aligned buffers; median of "
                      "interleaved rounds",
            "points": points}


def probe_at(probe: dict, chunk: float, threads: int) -> Optional[float]:
    """GB/s the probe measured at this thread count, interpolated in log(chunk)."""
    pts = sorted((p["chunk"], p["gb_per_s"]) for p in probe["points"] if p["threads"] == threads)
    if not pts:
        return None
    xs, ys = np.log([p[0] for p in pts]), [p[1] for p in pts]
    return float(np.interp(np.log(max(chunk, 1)), xs, ys))


def plot_disk(probe: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for t in sorted({p["threads"] for p in probe["points"]}):
        pts = sorted((p["chunk"], p["gb_per_s"]) for p in probe["points"] if p["threads"] == t)
        ax.plot([c / 1024 for c, _ in pts], [g for _, g in pts], marker="o", label=f"{t} threads")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (KiB)")
    ax.set_ylabel("random read throughput (GB/s)")
    ax.set_title("Direct random reads against chunk size (paper Fig. 2b)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# MARK: - windowing curve (Figure 4)


def active_sets(folder: Path, tokens: int = 512, seq_len: int = 128, source: str = "predicted", text=None,
                progress: bool = False):
    """Per layer (N, d_ff) bool masks over held-out text, and the sequence length."""
    import mlx.core as mx

    from ..format import FlashConfig
    from ..load import load_flash
    from ..flash.predictor import load_predictors
    from ..flash.sparsity import HELDOUT_TEXT, collect, read_texts, token_windows
    from ..sources import load_tokenizer

    folder = Path(folder)
    cfg = FlashConfig.load(folder)
    if cfg.predictors is None:
        raise FlashError(f"{folder} has no predictors: run python -m mlx_flash.train_predictors --model {folder}")
    if source not in ("predicted", "active"):
        raise FlashError("--source must be 'predicted' or 'active'")
    model, _ = load_flash(folder, "dense")
    windows = token_windows(load_tokenizer(folder), read_texts([str(text or HELDOUT_TEXT)]), tokens, seq_len)
    acts = collect(model, windows, progress=progress)
    del model
    if source == "active":
        ts = cfg.predictors["activation_threshold"]
        return [h.astype(np.float32) > t for h, t in zip(acts.hs, ts)], windows.shape[1], cfg
    preds = load_predictors(mx.load(str(folder / cfg.predictors["file"])), cfg.n_layers)
    masks = []
    for l, p in enumerate(preds):
        z = np.array(p(mx.array(acts.xs[l])).astype(mx.float32))  # (N, d_ff)
        masks.append(z > cfg.predictors["tau"][l])
    return masks, windows.shape[1], cfg


def window_curve(masks: List[np.ndarray], seq_len: int, windows: Iterable[int], skip: Optional[int] = None) -> dict:
    """Share of the FFN new per token and held, per window size, through a NeuronCache (rows=None).

    Windows do not cross sequences; the first `skip` tokens of each sequence (default: the
    largest window) are left out so every window size is measured on the same tokens.
    """
    from ..flash.neuron_cache import NeuronCache

    windows = sorted(set(windows))
    if min(windows) < 1:
        raise FlashError("window sizes must be at least 1")
    skip = max(windows) if skip is None else skip
    if skip >= seq_len:
        raise FlashError(f"sequences of {seq_len} tokens are too short for windows up to {max(windows)}")
    d_ff = masks[0].shape[1]
    out = []
    for k in windows:
        new = held = count = 0
        for m in masks:
            for s in range(0, len(m) - seq_len + 1, seq_len):
                cache = NeuronCache(d_ff, d_ff, k)
                for t in range(seq_len):
                    ids, _ = cache.step(np.flatnonzero(m[s + t]))
                    cache.commit()
                    if t >= skip:
                        new += len(ids)
                        held += cache.n
                        count += 1
        out.append({"window": k, "new_share": new / count / d_ff, "held_share": held / count / d_ff})
    predicted = float(np.mean([m.mean() for m in masks]))
    return {"predicted_share": predicted, "points": out, "tokens_measured_per_layer": count // len(masks)}


def plot_window(curve: dict, path: Path, source: str = "predicted"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [p["window"] for p in curve["points"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(ks, [100 * p["new_share"] for p in curve["points"]], marker="o", label="new per token (read)")
    ax.plot(ks, [100 * p["held_share"] for p in curve["points"]], marker="s", label="held in the window (DRAM)")
    ax.axhline(100 * curve["predicted_share"], ls="--", c="gray", lw=1, label=f"{source} per token")
    ax.set_xlabel("window size (tokens)")
    ax.set_ylabel("share of the FFN (%)")
    ax.set_title("Sliding window: loaded vs held neurons (paper Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# MARK: - command line


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Disk probe (paper Fig. 2b) and windowing curve (Fig. 4).")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("disk", help="random direct-read throughput against chunk size and threads")
    d.add_argument("--model", "-M", required=True, help="converted model folder (the disk to probe)")
    d.add_argument("--chunks", default=DEFAULT_CHUNKS, help="sizes: lo:hi (powers of two) or a,b,c")
    d.add_argument("--threads", default=DEFAULT_THREADS, help="thread counts: a,b,c or lo:hi")
    d.add_argument("--bytes", default=str(DEFAULT_BYTES), help="bytes read per point (default 32M)")
    d.add_argument("--scratch", default=None, help="file to read (default: ffn.bundles or a scratch file)")
    d.add_argument("--scratch-size", default=str(SCRATCH_SIZE), help="size of the scratch file (default 256M)")
    d.add_argument("--rounds", type=int, default=1, help="interleaved passes over the grid; medians")
    w = sub.add_parser("window", help="FFN share read and held against the window size")
    w.add_argument("--model", "-M", required=True, help="converted model folder with trained predictors")
    w.add_argument("--windows", default="1:10", help="window sizes: lo:hi or a,b,c")
    w.add_argument("--tokens", type=int, default=512, help="held-out tokens to run densely")
    w.add_argument("--seq-len", type=int, default=128)
    w.add_argument("--source", choices=["predicted", "active"], default="predicted")
    w.add_argument("--text", default=None, help="held-out text (default: mlx_flash/data/heldout.txt)")
    for s in (d, w):
        s.add_argument("--json", default=None, help="write the results to this file")
        s.add_argument("--plots", default=None, help="write a PNG into this folder")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    folder = Path(args.model)
    if not folder.is_dir():
        raise FlashError(f"{folder} is not a model folder")
    if args.command == "disk":
        path = scratch_file(folder, parse_size(args.scratch_size), args.scratch and Path(args.scratch))
        r = probe_disk(path, parse_range(args.chunks, size=True), parse_range(args.threads), parse_size(args.bytes),
                       progress=not args.quiet, rounds=max(1, args.rounds))
        threads = sorted({p["threads"] for p in r["points"]})
        print(f"direct random reads of {r['file']} ({r['file_bytes'] / 1e6:.0f} MB), "
              f"{r['bytes_per_point'] / 2**20:.0f} MiB per point, GB/s:")
        print("| chunk | " + " | ".join(f"{t} thr" for t in threads) + " |")
        print("| --- |" + " --- |" * len(threads))
        for c in sorted({p["chunk"] for p in r["points"]}):
            row = {p["threads"]: p["gb_per_s"] for p in r["points"] if p["chunk"] == c}
            print(f"| {c // 1024} KiB | " + " | ".join(f"{row[t]:.3f}" for t in threads) + " |")
        plot = plot_disk
    else:
        masks, seq_len, cfg = active_sets(folder, args.tokens, args.seq_len, args.source, args.text,
                                          progress=not args.quiet)
        r = window_curve(masks, seq_len, parse_range(args.windows))
        r.update(source=args.source, model=str(folder), tokens=args.tokens, seq_len=seq_len)
        print(f"{args.source} sets over {args.tokens} held-out tokens; {r['predicted_share']:.1%} of the FFN "
              f"per token; {r['tokens_measured_per_layer']} tokens per layer measured")
        print("| window | new per token | held |")
        print("| --- | --- | --- |")
        for p in r["points"]:
            print(f"| {p['window']} | {p['new_share']:.2%} | {p['held_share']:.2%} |")
        plot = lambda res, path: plot_window(res, path, args.source)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        out = Path(args.plots) / ("disk_probe.png" if args.command == "disk" else "windowing.png")
        plot(r, out)
        print(f"plot: {out}")


if __name__ == "__main__":
    main()
