"""What the operating system does with a model's files, and what it tells about this process.

- direct reads that bypass the page cache, and where they can be had (the disk's logical block
  size, filesystems in memory);
- a file mapped into memory whose pages can be made cold again (the naive baseline), and how
  much of a file the page cache holds (mincore);
- counters of this process: bytes fetched from storage, resident set, major page faults,
  memory available on the machine.

This module is the one place that picks Linux's or macOS's call, by what the platform offers
(`os.O_DIRECT`, `os.posix_fadvise`, /proc), at each call; a test that takes Linux's away runs
macOS's paths on Linux:

| what                     | Linux                                    | macOS                                 |
| direct reads             | open(O_DIRECT)                           | fcntl(F_NOCACHE)                      |
| make a file's pages cold | madvise + posix_fadvise (DONTNEED)       | msync(MS_INVALIDATE) on a mapping     |
| page cache residency     | mincore                                  | mincore                               |
| bytes read, resident set | /proc/self/io, /proc/self/status         | proc_pid_rusage (rusage_info_v2)      |
| memory available         | /proc/meminfo                            | physical memory (an upper bound)      |

(msync(MS_INVALIDATE) is how vmtouch -e evicts a file outside Linux.)
"""

import ctypes
import errno
import mmap
import os
import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import FlashError
from .format import round_up

F_NOCACHE = 48  # macOS <sys/fcntl.h>; Python's fcntl module lacks it before 3.13
MS_INVALIDATE = 2  # <sys/mman.h>, the same on Linux and macOS; Python's mmap has no msync flags
RUSAGE_INFO_V2 = 2  # macOS <sys/resource.h>
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}
OS_PAGE = mmap.PAGESIZE  # the unit of mincore, madvise and msync (16 KiB on Apple silicon)
PROC, SYS = "/proc", "/sys"  # Linux's process and device information (tests point them elsewhere)


# MARK: - direct reads


def logical_block_size(path) -> int:
    """The disk's logical block size: the unit of O_DIRECT offsets and lengths.

    st_blksize and statvfs give the filesystem's preferred I/O size, not this.
    """
    st = os.stat(path)
    dev = f"{SYS}/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
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
        with open(f"{PROC}/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if parts[2] == key and "-" in parts:
                    return parts[parts.index("-") + 1]
    except OSError:
        pass
    return None


def direct_read_method() -> str:
    """How open_direct bypasses the page cache on this platform."""
    return "O_DIRECT" if hasattr(os, "O_DIRECT") else "F_NOCACHE"


def open_direct(path: Path) -> int:
    """Open for reads that bypass the page cache, or raise FlashError saying why not."""
    if hasattr(os, "O_DIRECT"):  # Linux
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
    import fcntl  # macOS: the page cache is bypassed per open file, not per open() flag

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
    except OSError as e:
        os.close(fd)
        raise FlashError(f"cannot bypass the page cache for {path} (F_NOCACHE: {e.strerror}): pass direct=False "
                         f"to read through it")
    return fd


# MARK: - cold pages


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def eviction_method() -> str:
    """How MappedBundles.evict makes pages cold on this platform."""
    if hasattr(os, "posix_fadvise"):
        return "madvise(MADV_DONTNEED) on the mapping + posix_fadvise(POSIX_FADV_DONTNEED) on the file"
    return "msync(MS_INVALIDATE) on the mapping"


def _pages(offset: int, length: int):
    """The whole OS pages covering [offset, offset + length): (first byte, length)."""
    first = offset - offset % OS_PAGE
    return first, -(-(offset + length - first) // OS_PAGE) * OS_PAGE


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
        self._vec = np.zeros(round_up(self.size, OS_PAGE) // OS_PAGE, dtype=np.uint8)

    def evict(self, offset: int = 0, length: Optional[int] = None):
        """Drop the range's pages from this mapping and from the page cache (eviction_method()).

        Linux needs both calls: a mapped page is not dropped by fadvise, an unmapped cached page
        is not dropped by madvise. On macOS, invalidating a mapping drops the file's cached pages
        (what vmtouch -e does there); on Linux msync(MS_INVALIDATE) leaves clean pages cached, so
        callers check with resident_bytes() rather than trust the call.
        """
        length = self.size - offset if length is None else min(length, self.size - offset)
        if length <= 0:
            return
        if hasattr(os, "posix_fadvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, *_pages(offset, length))
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        else:
            first, n = _pages(offset, length)
            if _libc.msync(ctypes.c_void_p(self.address + first), n, MS_INVALIDATE) != 0:
                raise OSError(ctypes.get_errno(), f"msync(MS_INVALIDATE) of {self.path} failed")

    def resident_bytes(self, offset: int = 0, length: Optional[int] = None) -> int:
        """Bytes of the range's pages that the page cache holds (whole pages)."""
        length = self.size - offset if length is None else min(length, self.size - offset)
        if length <= 0:
            return 0
        first, n = _pages(offset, length)
        vec = self._vec[first // OS_PAGE : (first + n) // OS_PAGE]
        if _libc.mincore(ctypes.c_void_p(self.address + first), n, vec.ctypes.data_as(ctypes.c_void_p)) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return int(np.count_nonzero(vec & 1)) * OS_PAGE

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
    if os.path.getsize(path):
        mapped = MappedBundles(path)
        try:
            mapped.evict()
        finally:
            mapped.close()


def release_pages(path: Path):
    """Write back and forget a file that was read or written once (convert, calibration): cached, it
    would only push out what the user runs, and count against a memory cgroup's limit."""
    try:
        drop_cache(path)
    except OSError:  # a read-only or special file: its pages stay cached, nothing worse
        pass


def major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def readahead_bytes(path: Path) -> int:
    """The disk's readahead window (Linux): how far around a faulting page the kernel reads."""
    try:
        st = os.stat(path)
        dev = f"{SYS}/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        for rel in ("queue", "../queue"):
            try:
                return int(Path(f"{dev}/{rel}/read_ahead_kb").read_text()) * 1024
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return 128 * 1024  # the kernel's default


@contextmanager
def exclusive_lock(folder: Path):
    """Hold an exclusive lock on a folder (flock, Linux and macOS): processes that prepare a model
    in it take turns instead of writing the same files at once."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# MARK: - counters


def _proc_value(name: str, key: str) -> Optional[int]:
    """The number after `key` in a /proc file (Linux), or None."""
    try:
        with open(f"{PROC}/{name}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class _RusageInfoV2(ctypes.Structure):
    """macOS <sys/resource.h> struct rusage_info_v2 (times in Mach absolute units, sizes in bytes)."""

    _fields_ = [("ri_uuid", ctypes.c_uint8 * 16)] + [(name, ctypes.c_uint64) for name in (
        "ri_user_time", "ri_system_time", "ri_pkg_idle_wkups", "ri_interrupt_wkups", "ri_pageins",
        "ri_wired_size", "ri_resident_size", "ri_phys_footprint", "ri_proc_start_abstime",
        "ri_proc_exit_abstime", "ri_child_user_time", "ri_child_system_time", "ri_child_pkg_idle_wkups",
        "ri_child_interrupt_wkups", "ri_child_pageins", "ri_child_elapsed_abstime", "ri_diskio_bytesread",
        "ri_diskio_byteswritten")]


def _rusage_info() -> Optional[_RusageInfoV2]:
    """macOS: this process's proc_pid_rusage; None where libc has no such call."""
    call = getattr(_libc, "proc_pid_rusage", None)
    if call is None:
        return None
    info = _RusageInfoV2()
    return info if call(os.getpid(), RUSAGE_INFO_V2, ctypes.byref(info)) == 0 else None


def disk_read_bytes() -> int:
    """Bytes this process fetched from storage (page-cache fills and direct reads), all threads; -1 if unknown."""
    v = _proc_value("self/io", "read_bytes:")
    if v is not None:
        return v
    info = _rusage_info()
    return -1 if info is None else info.ri_diskio_bytesread


def peak_rss_bytes() -> int:
    """The largest resident set this process has had."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def rss_bytes() -> int:
    """This process's resident set now (its peak where the platform says nothing else)."""
    v = _proc_value("self/status", "VmRSS:")  # kB
    if v is not None:
        return v * 1024
    info = _rusage_info()
    return info.ri_resident_size if info is not None else peak_rss_bytes()


def mem_available() -> Optional[int]:
    """Memory the machine can give without swapping (Linux), or its physical memory (an upper bound)."""
    v = _proc_value("meminfo", "MemAvailable:")  # kB
    if v is not None:
        return v * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
