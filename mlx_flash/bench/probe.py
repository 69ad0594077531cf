"""What the disk can do: random direct-read throughput against chunk size and threads (paper Fig. 2b).

    python -m mlx_flash.probe disk --model models/smollm2-135m [--chunks 4K:4M] [--threads 1,2,4,8,16,32]
        [--bytes 32M] [--scratch FILE] [--json out.json] [--plots DIR]

Reads go with direct I/O (O_DIRECT / F_NOCACHE) on the disk that holds the model,
the way BundleReader reads (a ThreadPoolExecutor, os.preadv into aligned
buffers), so the two are comparable. The file read is the model's own
`ffn.bundles` when it is at least --scratch-size, else a scratch file of that
size written once next to the model (`.probe-scratch`). Every point reads the
same number of bytes at random offsets aligned to 4 KiB (to the disk's block
for chunks that are not whole pages, like single bundles).
"""

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np

from ..errors import FlashError
from ..format import BUNDLES_FILE, PAGE
from ..sizes import parse_size
from ..system import direct_read_method, logical_block_size, open_direct
from .cli import figure, write_outputs

DEFAULT_CHUNKS = "4K:4M"  # powers of two between
DEFAULT_THREADS = "1,2,4,8,16,32"
DEFAULT_BYTES = 32 << 20  # read per point
SCRATCH_SIZE = 256 << 20
SCRATCH_NAME = ".probe-scratch"


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
    fd = open_direct(path)
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
            "method": f"{direct_read_method()}, random offsets aligned to 4 KiB (to the disk's block for chunks that "
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
    with figure(path, "Direct random reads against chunk size (paper Fig. 2b)", "random read throughput (GB/s)",
                "chunk size (KiB)") as ax:
        for t in sorted({p["threads"] for p in probe["points"]}):
            pts = sorted((p["chunk"], p["gb_per_s"]) for p in probe["points"] if p["threads"] == t)
            ax.plot([c / 1024 for c, _ in pts], [g for _, g in pts], marker="o", label=f"{t} threads")
        ax.set_xscale("log", base=2)


def add_parser(sub):
    d = sub.add_parser("disk", help="random direct-read throughput against chunk size and threads")
    d.add_argument("--model", "-M", required=True, help="converted model folder (the disk to probe)")
    d.add_argument("--chunks", default=DEFAULT_CHUNKS, help="sizes: lo:hi (powers of two) or a,b,c")
    d.add_argument("--threads", default=DEFAULT_THREADS, help="thread counts: a,b,c or lo:hi")
    d.add_argument("--bytes", default=str(DEFAULT_BYTES), help="bytes read per point (default 32M)")
    d.add_argument("--scratch", default=None, help="file to read (default: ffn.bundles or a scratch file)")
    d.add_argument("--scratch-size", default=str(SCRATCH_SIZE), help="size of the scratch file (default 256M)")
    d.add_argument("--rounds", type=int, default=1, help="interleaved passes over the grid; medians")
    return d


def run(args) -> dict:
    """`probe disk`: the table, and the figure with --plots."""
    folder = Path(args.model)
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
    write_outputs(r, args.json, args.plots, lambda d: plot_disk(r, d / "disk_probe.png"))
    return r
