"""Reading neuron bundles from flash (paper Section 3.2, "Improving throughput").

The paper reads each active neuron's bundle (up row + down column, and gate row
for GLU models) with one read, from 32 threads, bypassing the OS page cache so
that the measured cost is the flash's and not DRAM's. This module does that on
Linux (O_DIRECT) and macOS (F_NOCACHE), into rows of a preallocated, aligned
buffer of whole bundles (`BundleBuffer`): the flash runtime's staging area, from
which the neuron cache copies the new neurons' fields into its packed arrays
(flash.neuron_cache), and the hybrid baseline's one-layer buffer.

    staging = alloc_buffer(rows, cfg.layout)       # once
    with BundleReader(folder, cfg) as reader:
        reader.read(layer, neurons, staging)       # bundle neurons[k] in row k

Direct I/O is all or nothing: if it cannot be had (a filesystem in memory, a
disk whose block size does not divide the bundle alignment) the reader says so
and stops instead of silently measuring the page cache; `direct=False` is the
explicit opt-out. Every bundle carries a CRC-32, checked right after its read.
"""

import errno
import os
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx
import numpy as np

from ..errors import FlashError
from ..format import BUNDLES_FILE, BundleLayout, FlashConfig, field_arrays
from ..system import logical_block_size, open_direct

BUFFER_ALIGN = 4096  # destination rows start on a page: enough for any disk's O_DIRECT
IOV_MAX = 1024  # buffers one preadv takes (Linux and macOS)
MAX_CHUNK = 1 << 20  # split longer runs so threads share them (the paper: >= 32 KiB pays off)
LAYER_CHUNK = 4 << 20  # read_layer_all: large sequential reads
_EAGAIN_RETRIES = 1000


# MARK: - destination buffer


class BundleBuffer:
    """`slots` whole bundle rows in ONE MLX uint8 array (so MLX's memory figures count it),
    also seen by numpy without a copy.

    The reader writes into `np` (the OS needs a writable buffer address). Rows start on a
    BUFFER_ALIGN boundary so O_DIRECT can land in them. `fields(n)` are typed MLX views of
    rows [0, n), strided (the fields interleave), which MLX copies when it computes on them.
    MLX is lazy: evaluate what was built on them before the rows are refilled.
    """

    def __init__(self, slots: int, layout: BundleLayout, align: int = BUFFER_ALIGN):
        self.slots, self.layout = slots, layout
        size = slots * layout.stride
        self._owner = mx.zeros((size + align,), dtype=mx.uint8)  # keeps the memory alive
        mx.eval(self._owner)
        whole = np.array(memoryview(self._owner), copy=False)  # shares memory
        off = -whole.ctypes.data % align
        self.np = whole[off : off + size].reshape(slots, layout.stride)  # (slots, stride) uint8
        self.mx = self._owner[off : off + size].reshape(slots, layout.stride)  # same bytes
        mx.eval(self.mx)
        assert np.array(memoryview(self.mx), copy=False).ctypes.data == self.address

    @property
    def address(self) -> int:
        return self.np.ctypes.data

    def field(self, name: str, n: Optional[int] = None):
        """One field ("gate", "up", "down", "bias") over rows [0, n): an array or a quantized triple."""
        return self.fields(n)[name]

    def fields(self, n: Optional[int] = None) -> Dict:
        """Typed MLX views of every bundle field over rows [0, n) (format.field_arrays): strided, so
        MLX copies them when it computes on them."""
        return field_arrays(self.mx if n is None else self.mx[:n], self.layout)


def alloc_buffer(slots: int, layout: BundleLayout, align: int = BUFFER_ALIGN) -> BundleBuffer:
    return BundleBuffer(slots, layout, align)


# MARK: - statistics


@dataclass
class ReadStats:
    """What the reads cost: the figures beside ms/token in a benchmark."""

    direct: bool = True  # page cache bypassed (False only when asked for)
    calls: int = 0  # read() / read_layer_all() calls
    bundles: int = 0  # bundles asked for
    bytes_read: int = 0  # bundles x stride
    syscalls: int = 0  # preadv calls, retries included
    seconds: float = 0.0  # wall time inside the read calls (I/O and CRC)

    def reset(self):
        direct = self.direct
        self.__init__(direct=direct)

    def snapshot(self) -> "ReadStats":
        return replace(self)

    def add(self, other: "ReadStats"):
        for k in ("calls", "bundles", "bytes_read", "syscalls", "seconds"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


# MARK: - the reader


class BundleReader:
    """Reads neuron bundles of `ffn.bundles` into rows of a BundleBuffer.

    Neurons whose bundles are adjacent on disk and whose destination rows are
    adjacent become one read (the neuron cache appends new neurons in ascending
    order, so this is the common case; its coalescing makes it commoner).
    """

    def __init__(self, path, cfg: FlashConfig, threads: int = 32, direct: bool = True,
                 verify: bool = True, max_chunk: int = MAX_CHUNK, unit: str = "neuron"):
        """unit: what a bundle holds, for messages ("expert": expert_format.Extents stands for cfg)."""
        path = Path(path)
        self.unit, self.bundle = unit, "bundle" if unit == "neuron" else f"{unit} extent"
        self.path = path / BUNDLES_FILE if path.is_dir() else path
        self.cfg, self.layout = cfg, cfg.layout
        self.threads, self.verify = max(1, threads), verify
        self.chunk_bundles = max(1, max_chunk // self.layout.stride)
        if not self.path.is_file():
            raise FlashError(f"{self.path} is missing")
        size = self.path.stat().st_size
        if size != cfg.file_size:
            raise FlashError(
                f"{self.path} is truncated or corrupt: {size} bytes, expected {cfg.file_size}; "
                f"convert the model again"
            )
        if direct:
            block = logical_block_size(self.path)
            if self.layout.alignment % block:
                raise FlashError(
                    f"{self.path} was converted with {self.layout.alignment}-byte bundle alignment but "
                    f"its disk reads in {block}-byte blocks: reconvert with --align {max(block, 4096)}"
                )
            self.fd = open_direct(self.path)
        else:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise FlashError(f"cannot open {self.path}: {e.strerror}")
        self.direct = direct
        self.stats = ReadStats(direct=direct)  # cumulative
        self.last = ReadStats(direct=direct)  # the latest call (each read also returns its own)
        self._lock = threading.Lock()
        self.before_close = []  # what must stop before the threads do (a Prefetcher using this reader)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bundle-read")

    # -- public API

    def read(self, layer: int, neurons: np.ndarray, dest: Union[BundleBuffer, np.ndarray],
             start_row: int = 0, rows: Optional[np.ndarray] = None) -> ReadStats:
        """Read bundle neurons[k] of `layer` into dest row start_row + k (or rows[k]); returns what it cost."""
        buf = self._dest(dest)
        neurons = np.asarray(neurons, dtype=np.int64).ravel()
        if rows is None:
            rows = np.arange(start_row, start_row + len(neurons), dtype=np.int64)
        else:
            rows = np.asarray(rows, dtype=np.int64).ravel()
            assert len(rows) == len(neurons)
        self._check(layer, neurons, rows, len(buf))
        return self._run(layer, neurons, rows, buf, self.chunk_bundles)

    def read_into(self, layer: int, neurons: np.ndarray, rows: np.ndarray, sink, scratch: np.ndarray) -> ReadStats:
        """Read bundle neurons[k] of `layer` straight into row rows[k] of `sink`'s field arrays (a
        flash.neuron_cache.NeuronBuffer whose `segments` say where each piece of a bundle goes): the
        aligned fields land in place, the other bytes in row k of `scratch` ((m, sink.scratch_bytes),
        aligned), from which `sink.finish` copies them. CRCs are checked over the pieces."""
        neurons = np.asarray(neurons, dtype=np.int64).ravel()
        rows = np.asarray(rows, dtype=np.int64).ravel()
        assert len(rows) == len(neurons) and scratch.shape[0] >= len(neurons)
        assert not self.direct or scratch.ctypes.data % self.layout.alignment == 0, "scratch not aligned"
        self._check(layer, neurons, rows, sink.slots)
        t0 = time.perf_counter()
        per = max(1, min(self.chunk_bundles, IOV_MAX // len(sink.segments)))
        brk = np.flatnonzero(np.diff(neurons) != 1) + 1  # runs consecutive on disk; rows may be anywhere
        chunks = []  # (first neuron, its index, bundles)
        for start, end in zip(np.r_[0, brk].tolist(), np.r_[brk, len(neurons)].tolist()):
            chunks += [(int(neurons[k]), k, min(per, end - k)) for k in range(start, end, per)]
        syscalls = self._dispatch(self._read_fields, layer, chunks, (rows, sink, scratch))
        sink.finish(rows, scratch[: len(neurons)])
        call = ReadStats(direct=self.direct, calls=1, bundles=len(neurons), bytes_read=len(neurons) * self.layout.stride,
                         syscalls=syscalls, seconds=time.perf_counter() - t0)
        return self._record(call)

    def read_layer_all(self, layer: int, dest: Union[BundleBuffer, np.ndarray],
                       chunk_bytes: int = LAYER_CHUNK) -> ReadStats:
        """Every bundle of `layer` into dest rows [0, d_ff), in large reads (dense mode)."""
        buf = self._dest(dest)
        neurons = np.arange(self.cfg.d_ff, dtype=np.int64)
        self._check(layer, neurons, neurons, len(buf))
        return self._run(layer, neurons, neurons, buf, max(1, chunk_bytes // self.layout.stride))

    def close(self):
        while self.before_close:
            self.before_close.pop()()
        if self.fd >= 0:
            self._pool.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals

    def _dest(self, dest) -> np.ndarray:
        buf = dest.np if isinstance(dest, BundleBuffer) else dest
        assert buf.dtype == np.uint8 and buf.ndim == 2 and buf.shape[1] == self.layout.stride
        assert buf.flags.c_contiguous, "destination rows must be one contiguous block"
        if self.direct:
            assert buf.ctypes.data % self.layout.alignment == 0, "destination not aligned: use alloc_buffer"
        return buf

    def _check(self, layer, neurons, rows, capacity):
        if not 0 <= layer < self.cfg.n_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.cfg.n_layers})")
        if len(neurons) and (neurons.min() < 0 or neurons.max() >= self.cfg.d_ff):
            raise IndexError(f"neuron ids out of range [0, {self.cfg.d_ff})")
        if len(rows) and (rows.min() < 0 or rows.max() >= capacity):
            raise IndexError(f"destination rows out of range [0, {capacity})")

    def _run(self, layer, neurons, rows, buf, chunk_bundles):
        """Split into runs (consecutive on disk and in rows), runs into chunks; read them."""
        t0 = time.perf_counter()
        stride = self.layout.stride
        call = ReadStats(direct=self.direct, calls=1, bundles=len(neurons), bytes_read=len(neurons) * stride)
        if len(neurons):
            brk = np.flatnonzero((np.diff(neurons) != 1) | (np.diff(rows) != 1)) + 1
            starts = np.concatenate([[0], brk])  # (runs,) index of each run's first neuron
            lens = np.diff(np.append(starts, len(neurons)))
            nch = -(-lens // chunk_bundles)  # chunks per run
            run = np.repeat(np.arange(len(starts)), nch)  # (chunks,) its run
            k = np.arange(len(run)) - np.repeat(np.cumsum(nch) - nch, nch)  # chunk index within run
            first = starts[run] + k * chunk_bundles  # index into neurons of each chunk's head
            count = np.minimum(chunk_bundles, lens[run] - k * chunk_bundles)
            chunks = list(zip(neurons[first].tolist(), rows[first].tolist(), count.tolist()))
            call.syscalls = self._dispatch(self._read_chunks, layer, chunks, (buf,))
        call.seconds = time.perf_counter() - t0
        return self._record(call)

    def _record(self, call: ReadStats) -> ReadStats:
        with self._lock:  # reads may run on several threads at once (prefetch)
            self.last = call
            self.stats.add(call)
        return call

    def _dispatch(self, worker, layer: int, chunks: list, args: tuple) -> int:
        """Deal the chunks out to the threads (one in this thread when a single task); returns syscalls."""
        tasks = [chunks[w :: self.threads] for w in range(min(self.threads, len(chunks)))]
        if len(tasks) <= 1:
            return worker(layer, tasks[0], *args) if tasks else 0
        futures = [self._pool.submit(worker, layer, t, *args) for t in tasks]
        wait(futures)  # all of them, even after a failure: no thread may still be writing
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]
        return sum(f.result() for f in futures)

    def _read_chunks(self, layer: int, chunks, buf: np.ndarray) -> int:
        """Worker: read each (first neuron, first row, bundles) chunk fully, then check CRCs.

        The CRCs come after all of this worker's reads, not between them: interleaving
        them made verification cost 2-3x more on a 2-core machine (GIL hand-offs
        between the threads returning from preadv), while after the reads it overlaps
        the other workers' I/O (measured: +0-5 ms on 400 random 12.5 KiB bundles).
        """
        syscalls, done = 0, []
        for neuron, row, count in chunks:
            mv = memoryview(buf[row : row + count].reshape(-1))  # zero-copy, writable
            syscalls += self._preadv(layer, neuron, [mv], count)
            done.append((neuron, count, mv))
        if self.verify:
            for neuron, count, mv in done:
                self._verify(layer, neuron, count, mv)
        return syscalls

    def _read_fields(self, layer: int, chunks, rows: np.ndarray, sink, scratch: np.ndarray) -> int:
        """Worker of read_into: per (first neuron, first index, bundles) chunk, one preadv whose buffers
        are each bundle's pieces in file order; then the CRCs, chained over the pieces."""
        syscalls, pieces = 0, {}
        for neuron, first, count in chunks:
            iovs = []
            for k in range(first, first + count):
                pieces[k] = sink.pieces(int(rows[k]), scratch[k])
                iovs += pieces[k]
            syscalls += self._preadv(layer, neuron, iovs, count)
        if self.verify:
            lay = self.layout
            for neuron, first, count in chunks:
                for k in range(first, first + count):
                    crc, left = 0, lay.nbytes
                    for mv in pieces[k]:
                        crc = zlib.crc32(mv[: min(len(mv), max(left, 0))], crc)
                        left -= len(mv)
                    if crc != sink.stored_crc(scratch[k]):
                        i = neuron + k - first
                        raise FlashError(f"{self.path}: corrupted {self.bundle}: layer {layer} {self.unit} {i} at "
                                         f"offset {self.cfg.bundle_offset(layer, i)} (checksum mismatch)")
        return syscalls

    def _preadv(self, layer: int, neuron: int, iovs: list, count: int) -> int:
        """Read `count` whole bundles from `neuron` on into the buffers `iovs` (in file order); returns
        the syscalls made. Short reads continue where they stopped; errors name the bundle."""
        stride = self.layout.stride
        off, done, total, again, syscalls = self.cfg.bundle_offset(layer, neuron), 0, count * stride, 0, 0
        while done < total:
            try:
                syscalls += 1
                got = os.preadv(self.fd, iovs, off + done)  # EINTR retried by Python
            except BlockingIOError:
                again += 1
                if again < _EAGAIN_RETRIES:
                    continue
                raise self._error(layer, neuron + done // stride, off + done, "busy (EAGAIN)")
            except OSError as e:
                why = e.strerror
                if e.errno == errno.EINVAL and self.direct:
                    why += (f" (direct read refused: the disk may need a bundle alignment larger "
                            f"than {self.layout.alignment}; reconvert with --align 4096)")
                raise self._error(layer, neuron + done // stride, off + done, why)
            if got == 0 or (got % stride and off + done + got >= os.fstat(self.fd).st_size):
                raise self._error(layer, neuron + (done + got) // stride, off + done + got,
                                  "the file ends there (truncated): convert the model again")
            done += got
            while iovs and got >= len(iovs[0]):  # drop what arrived
                got -= len(iovs[0])
                iovs = iovs[1:]
            if got:
                iovs = [iovs[0][got:]] + iovs[1:]
        return syscalls

    def _verify(self, layer: int, neuron: int, count: int, mv: memoryview):
        """CRC-32 of each bundle just read (zlib releases the GIL on buffers this large)."""
        lay = self.layout
        for j in range(count):
            b = j * lay.stride
            stored = int.from_bytes(mv[b + lay.crc_offset : b + lay.stride], "little")
            if zlib.crc32(mv[b : b + lay.nbytes]) != stored:
                i = neuron + j
                raise FlashError(
                    f"{self.path}: corrupted {self.bundle}: layer {layer} {self.unit} {i} at offset "
                    f"{self.cfg.bundle_offset(layer, i)} (checksum mismatch)"
                )

    def _error(self, layer, neuron, offset, why) -> FlashError:
        return FlashError(f"cannot read {self.path}: layer {layer} {self.unit} {neuron} at offset {offset}: {why}")
