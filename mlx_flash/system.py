"""What the operating system does with a model's files, and what it tells about this process.

- direct reads that bypass the page cache (O_DIRECT on Linux, F_NOCACHE on macOS), and where
  they can be had (the disk's logical block size, filesystems in memory);
- a file mapped into memory whose pages can be made cold again (the naive baseline), and how
  much of a file the page cache holds (mincore);
- counters of this process: bytes fetched from storage, resident set, major page faults,
  memory available on the machine.
"""

import ctypes
import errno
import mmap
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import FlashError
from .format import PAGE, round_up

F_NOCACHE = 48  # macOS <sys/fcntl.h>; Python's fcntl module lacks it before 3.13
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}


# MARK: - direct reads


def logical_block_size(path) -> int:
    """The disk's logical block size: the unit of O_DIRECT offsets and lengths.

    st_blksize and statvfs give the filesystem's preferred I/O size, not this.
    """
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for rel in ("queue", "../queue"):  # a whole disk, or a partition of one
        try:
            with open(f"{dev}/{rel}/logical_block_size") as f:
                return int(f.read())
        except (OSError, ValueError):
            pass
    return 512


def filesystem_type(path) -> Optional[str]:
    """Linux: the type of the filesystem holding `path` (from /proc/self/mountinfo)."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[2] == key and "-" in parts:
                    return parts[parts.index("-") + 1]
    except OSError:
        pass
    return None


def open_direct(path: Path) -> int:
    """Open for reads that bypass the page cache, or raise FlashError saying why not."""
    if sys.platform.startswith("linux"):
        fs = filesystem_type(path)
        if fs in MEMORY_FILESYSTEMS:  # recent kernels accept O_DIRECT there: it would read DRAM
            raise FlashError(
                f"{path} is on {fs}, a filesystem in memory, so direct reads would not come from "
                f"a disk: put the model on an SSD, or pass direct=False to read through the page cache"
            )
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise FlashError(f"cannot open {path}: {e.strerror}")
            raise FlashError(
                f"the filesystem holding {path} refuses direct I/O (O_DIRECT): put the model on "
                f"another disk, or pass direct=False to read through the page cache"
            )
    if sys.platform == "darwin":
        import fcntl

        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
        except OSError as e:
            os.close(fd)
            raise FlashError(f"cannot bypass the page cache for {path} (F_NOCACHE: {e.strerror})")
        return fd
    raise FlashError(f"direct reads are not supported on {sys.platform}: pass direct=False")


# MARK: - cold pages


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


class MappedBundles:
    """`ffn.bundles` mapped read-only; `evict` makes a range cold, `resident_bytes` counts
    how much of it the page cache holds (mincore: page cache residency, mapped or not)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        os.fsync(self.fd)  # dirty pages (a model just written) would survive fadvise(DONTNEED)
        self.size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
        self.np = np.frombuffer(self.mm, dtype=np.uint8)  # (size,) zero-copy view of the mapping
        self.address = self.np.ctypes.data
        self._vec = np.zeros(round_up(self.size, PAGE) // PAGE, dtype=np.uint8)

    def evict(self, offset: int = 0, length: Optional[int] = None):
        """Drop the range from this mapping and from the page cache (both needed: a mapped
        page is not dropped by fadvise, an unmapped cached page is not dropped by madvise)."""
        length = self.size - offset if length is None else min(length, self.size - offset)
        self.mm.madvise(mmap.MADV_DONTNEED, offset, length)
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def resident_bytes(self, offset: int = 0, length: Optional[int] = None) -> int:
        length = self.size - offset if length is None else min(length, self.size - offset)
        first, last = offset // PAGE, (offset + length + PAGE - 1) // PAGE
        vec = self._vec[first:last]
        if _libc.mincore(ctypes.c_void_p(self.address + first * PAGE), (last - first) * PAGE,
                         vec.ctypes.data_as(ctypes.c_void_p)) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return int(np.count_nonzero(vec & 1)) * PAGE

    def close(self):
        if self.fd >= 0:
            del self.np
            try:
                self.mm.close()
            except BufferError:  # a view is still alive somewhere: the GC unmaps it later
                pass
            os.close(self.fd)
            self.fd = -1


def drop_cache(path: Path):
    """Drop a file's clean pages from the page cache (after a buffered read of it), so that the next
    reader finds them cold, and under a memory cgroup gets them charged to its own group."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def readahead_bytes(path: Path) -> int:
    """The disk's readahead window (Linux): how far around a faulting page the kernel reads."""
    try:
        st = os.stat(path)
        dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        for rel in ("queue", "../queue"):
            try:
                return int(Path(f"{dev}/{rel}/read_ahead_kb").read_text()) * 1024
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return 128 * 1024  # the kernel's default



# MARK: - counters


def _proc_value(path: str, key: str) -> Optional[int]:
    """The number after `key` in a /proc file (Linux), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def disk_read_bytes() -> int:
    """Bytes this process fetched from storage (page-cache fills and direct reads), all threads; -1 if unknown."""
    v = _proc_value("/proc/self/io", "read_bytes:")
    return -1 if v is None else v


def rss_bytes() -> int:
    v = _proc_value("/proc/self/status", "VmRSS:")  # kB
    return v * 1024 if v is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available() -> Optional[int]:
    v = _proc_value("/proc/meminfo", "MemAvailable:")  # kB
    return None if v is None else v * 1024
