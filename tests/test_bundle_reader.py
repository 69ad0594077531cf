"""BundleReader: exact bytes, typed views, coalescing, checksums, direct I/O or a clear error."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flash_fixtures import direct_root, write_flash_model  # noqa: F401 (fixture)
from mlx_flash import system
from mlx_flash.flash import bundle_reader as br
from mlx_flash.flash.bundle_reader import BundleReader, alloc_buffer
from mlx_flash.errors import FlashError
from mlx_flash.format import BUNDLES_FILE

Q4 = {"bits": 4, "group_size": 32}
GEOMETRIES = {
    "f16-glu": dict(),
    "q4-glu": dict(quantization=Q4),
    "f32-relu-wide": dict(d_model=320, d_ff=96, glu=False, dtype="float32"),  # stride 3072
}


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def model(request, direct_root):
    folder = direct_root / request.param
    cfg, bundles = write_flash_model(folder, **GEOMETRIES[request.param])
    return folder, cfg, bundles


@pytest.fixture(scope="module")
def f16(direct_root):
    folder = direct_root / "f16-own"
    cfg, bundles = write_flash_model(folder, seed=1)
    return folder, cfg, bundles


def runs(neurons):
    return 1 + int(np.count_nonzero(np.diff(neurons) != 1)) if len(neurons) else 0


# MARK: - exact bytes, stats, coalescing


def test_read_exact_bytes_and_stats(model):
    folder, cfg, bundles = model
    rng = np.random.default_rng(0)
    buf = alloc_buffer(cfg.d_ff, cfg.layout)
    with BundleReader(folder, cfg, threads=4) as r:
        assert r.stats.direct and r.fd >= 0
        for layer in range(cfg.n_layers):
            neurons = np.sort(rng.choice(cfg.d_ff, cfg.d_ff // 3, replace=False))
            r.read(layer, neurons, buf, start_row=5)
            np.testing.assert_array_equal(buf.np[5 : 5 + len(neurons)], bundles[layer, neurons])
            s = r.last
            assert s.bytes_read == len(neurons) * cfg.layout.stride
            assert s.syscalls == runs(neurons)  # one preadv per run of consecutive neurons
        assert r.stats.calls == cfg.n_layers
        assert r.stats.bytes_read == cfg.n_layers * (cfg.d_ff // 3) * cfg.layout.stride


def test_direct_flag_really_set(f16):
    folder, cfg, _ = f16
    with BundleReader(folder, cfg) as r:
        if sys.platform.startswith("linux"):
            import fcntl

            assert fcntl.fcntl(r.fd, fcntl.F_GETFL) & os.O_DIRECT
        raw = np.zeros(4 * cfg.layout.stride + 4096 + 1, np.uint8)
        off = -raw.ctypes.data % 4096 + 1
        misaligned = raw[off : off + 4 * cfg.layout.stride].reshape(4, cfg.layout.stride)
        with pytest.raises(AssertionError, match="aligned"):  # O_DIRECT needs an aligned destination
            r.read(0, [1], misaligned)


def test_runs_and_chunks(f16):
    folder, cfg, bundles = f16
    stride = cfg.layout.stride
    buf = alloc_buffer(64, cfg.layout)
    neurons = np.array([0, 1, 2, 10, 11, 50])
    with BundleReader(folder, cfg, threads=8) as r:
        r.read(1, neurons, buf)
        assert r.last.syscalls == 3
        np.testing.assert_array_equal(buf.np[:6], bundles[1, neurons])
    with BundleReader(folder, cfg, threads=8, max_chunk=2 * stride) as r:  # run of 3 -> chunks 2 + 1
        buf.np[:] = 0
        r.read(2, neurons, buf)
        assert r.last.syscalls == 4
        np.testing.assert_array_equal(buf.np[:6], bundles[2, neurons])
        r.read(2, np.arange(40), buf, start_row=10)  # one run, 20 chunks over 8 threads
        assert r.last.syscalls == 20
        np.testing.assert_array_equal(buf.np[10:50], bundles[2, :40])


def test_explicit_rows(f16):
    folder, cfg, bundles = f16
    buf = alloc_buffer(32, cfg.layout)
    neurons, rows = np.array([7, 8, 9, 100, 3]), np.array([20, 21, 22, 0, 31])
    with BundleReader(folder, cfg, threads=3) as r:
        r.read(0, neurons, buf, rows=rows)
        assert r.last.syscalls == 3  # 7..9 -> rows 20..22 is one read
    np.testing.assert_array_equal(buf.np[rows], bundles[0, neurons])


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_reads(f16, data):
    folder, cfg, bundles = f16
    k = data.draw(st.integers(1, cfg.d_ff))
    neurons = np.sort(np.array(data.draw(st.lists(st.integers(0, cfg.d_ff - 1), min_size=k, max_size=k,
                                                  unique=True)), dtype=np.int64))
    start = data.draw(st.integers(0, 16))
    threads = data.draw(st.sampled_from([1, 2, 7, 32]))
    layer = data.draw(st.integers(0, cfg.n_layers - 1))
    buf = alloc_buffer(cfg.d_ff + 16, cfg.layout)
    with BundleReader(folder, cfg, threads=threads, max_chunk=3 * cfg.layout.stride) as r:
        r.read(layer, neurons, buf, start_row=start)
    np.testing.assert_array_equal(buf.np[start : start + k], bundles[layer, neurons])
    assert r.last.bytes_read == k * cfg.layout.stride


def test_read_layer_all(f16):
    folder, cfg, bundles = f16
    buf = alloc_buffer(cfg.d_ff, cfg.layout)
    with BundleReader(folder, cfg, threads=4) as r:
        for layer in range(cfg.n_layers):
            r.read_layer_all(layer, buf, chunk_bytes=32 << 10)
            np.testing.assert_array_equal(buf.np, bundles[layer])
        assert r.last.syscalls == cfg.d_ff * cfg.layout.stride // (32 << 10)


def test_stats_reset_snapshot(f16):
    folder, cfg, _ = f16
    buf = alloc_buffer(8, cfg.layout)
    with BundleReader(folder, cfg, threads=2) as r:
        r.read(0, [1, 2], buf)
        snap = r.stats.snapshot()
        r.read(0, [4], buf)
        assert snap.bundles == 2 and r.stats.bundles == 3 and r.stats.calls == 2
        r.stats.reset()
        assert r.stats.bundles == 0 and r.stats.direct and snap.bundles == 2


# MARK: - typed MLX views on the same memory


def test_typed_views_f16(f16):
    folder, cfg, bundles = f16
    lay, d = cfg.layout, cfg.d_model
    buf = alloc_buffer(16, lay)
    ptr = buf.address
    neurons = np.array([3, 4, 9, 200])

    def ref(name, ns):
        f = lay.field(name)
        return bundles[0, ns][:, f.offset : f.offset + f.nbytes].copy().view(np.float16)

    with BundleReader(folder, cfg, threads=2) as r:
        r.read(0, neurons, buf)
        fields = buf.fields(4)
        assert set(fields) == {"gate", "up", "down", "bias"} and fields["bias"].shape == (4, 2)
        for name in ("gate", "up", "down", "bias"):
            np.testing.assert_array_equal(np.array(fields[name]), ref(name, neurons))
        x = mx.array(np.random.default_rng(0).standard_normal((2, d)).astype(np.float16))
        y = x @ fields["up"].T  # MLX computes on the buffer's rows in place
        want = np.array(x).astype(np.float32) @ ref("up", neurons).T.astype(np.float32)
        np.testing.assert_allclose(np.array(y), want, rtol=2e-2, atol=2e-2)
        more = np.array([17, 18])  # appended later: a fresh view sees them, same memory
        r.read(0, more, buf, start_row=4)
        np.testing.assert_array_equal(np.array(buf.field("gate", 6)), ref("gate", np.r_[neurons, more]))
    assert buf.address == ptr


def test_views_stay_views(f16):
    """An evaluated field view still sees bytes read later: it is the buffer, not a copy."""
    folder, cfg, bundles = f16
    buf = alloc_buffer(4, cfg.layout)
    gate = buf.field("gate", 4)
    mx.eval(gate)
    with BundleReader(folder, cfg, threads=1) as r:
        r.read(1, [10, 11, 12, 13], buf)
    f = cfg.layout.field("gate")
    want = bundles[1, 10:14][:, f.offset : f.offset + f.nbytes].copy().view(np.float16)
    np.testing.assert_array_equal(np.array(gate), want)


def test_typed_views_quantized(direct_root):
    folder = direct_root / "q4-views"
    cfg, bundles = write_flash_model(folder, quantization=Q4, seed=3)
    lay = cfg.layout
    buf = alloc_buffer(8, lay)
    neurons = np.array([0, 5, 6, 255])
    with BundleReader(folder, cfg, threads=2) as r:
        r.read(2, neurons, buf)
    fields = buf.fields(4)
    for name in ("gate", "up", "down"):
        w, s, b = fields[name]
        assert w.dtype == mx.uint32 and w.shape == (4, cfg.d_model // 8)

        def ref(part, dt):
            f = lay.field(f"{name}.{part}")
            return mx.array(bundles[2, neurons][:, f.offset : f.offset + f.nbytes].copy().view(dt))

        want = mx.dequantize(ref("weight", np.uint32), ref("scales", np.float16), ref("biases", np.float16),
                             group_size=32, bits=4)
        got = mx.dequantize(w, s, b, group_size=32, bits=4)
        np.testing.assert_array_equal(np.array(got), np.array(want))
        x = mx.ones((1, cfg.d_model), dtype=mx.float16)
        q = dict(transpose=True, group_size=32, bits=4)
        np.testing.assert_array_equal(np.array(mx.quantized_matmul(x, w, s, b, **q)),
                                      np.array(mx.quantized_matmul(x, ref("weight", np.uint32),
                                               ref("scales", np.float16), ref("biases", np.float16), **q)))


# MARK: - failures are loud and precise


def test_corrupt_bundle(direct_root):
    folder = direct_root / "corrupt"
    cfg, _ = write_flash_model(folder, seed=4)
    off = cfg.bundle_offset(1, 37) + 10
    with open(folder / BUNDLES_FILE, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0x40]))
    buf = alloc_buffer(64, cfg.layout)
    with BundleReader(folder, cfg, threads=4) as r:
        r.read(1, np.r_[0:37], buf)  # the neighbours are fine
        r.read(1, np.r_[38:60], buf)
        r.read(0, [37], buf)
        with pytest.raises(FlashError, match=rf"corrupted bundle: layer 1 neuron 37 at offset {off - 10} "):
            r.read(1, np.r_[30:50], buf)
        with pytest.raises(FlashError, match="layer 1 neuron 37"):
            r.read_layer_all(1, alloc_buffer(cfg.d_ff, cfg.layout))
    with BundleReader(folder, cfg, verify=False) as r:
        r.read(1, [37], buf)  # opted out


def test_truncated_file(direct_root):
    folder = direct_root / "truncated"
    cfg, bundles = write_flash_model(folder, seed=5)
    path = folder / BUNDLES_FILE
    cut = cfg.bundle_offset(2, 100) + 100
    reader = BundleReader(folder, cfg, threads=4)  # opened whole, cut while open
    os.truncate(path, cut)
    buf = alloc_buffer(cfg.d_ff, cfg.layout)
    buf.np[:] = 0xAA
    with reader as r:
        r.read(2, np.r_[0:100], buf)
        np.testing.assert_array_equal(buf.np[:100], bundles[2, :100])
        cut_msg = r"layer 2 neuron 100 at offset \d+: the file ends there \(truncated\)"
        with pytest.raises(FlashError, match=cut_msg):
            r.read(2, [99, 100, 101], buf)
        with pytest.raises(FlashError, match="layer 2 neuron 1[0-9][0-9] .*truncated"):
            r.read(2, [150], buf)
    with pytest.raises(FlashError, match="truncated or corrupt"):
        BundleReader(folder, cfg)


def test_memory_filesystem_refused(tmp_path):
    shm = Path("/dev/shm")
    if not sys.platform.startswith("linux") or system.filesystem_type(shm) not in system.MEMORY_FILESYSTEMS:
        pytest.skip("no tmpfs at /dev/shm")
    folder = Path(tempfile.mkdtemp(dir=shm))
    try:
        cfg, bundles = write_flash_model(folder, n_layers=1, seed=6)
        with pytest.raises(FlashError, match="filesystem in memory.*direct=False"):
            BundleReader(folder, cfg)
        buf = alloc_buffer(4, cfg.layout)
        with BundleReader(folder, cfg, direct=False) as r:
            r.read(0, [1, 2, 3], buf)
            assert r.stats.direct is False and r.last.direct is False
        np.testing.assert_array_equal(buf.np[:3], bundles[0, 1:4])
    finally:
        shutil.rmtree(folder)


def test_block_size_must_divide_alignment(f16, monkeypatch):
    folder, cfg, _ = f16
    monkeypatch.setattr(br, "logical_block_size", lambda path: 4096)
    with pytest.raises(FlashError, match="reconvert with --align 4096"):
        BundleReader(folder, cfg)
    BundleReader(folder, cfg, direct=False).close()  # no direct I/O, no constraint


def test_logical_block_size_of_this_disk(f16):
    folder, _, _ = f16
    bs = system.logical_block_size(folder / BUNDLES_FILE)
    assert bs in (512, 1024, 2048, 4096)


def test_bad_arguments(f16):
    folder, cfg, _ = f16
    buf = alloc_buffer(4, cfg.layout)
    with BundleReader(folder, cfg) as r:
        with pytest.raises(IndexError):
            r.read(cfg.n_layers, [0], buf)
        with pytest.raises(IndexError):
            r.read(0, [cfg.d_ff], buf)
        with pytest.raises(IndexError):
            r.read(0, [0, 1], buf, start_row=3)
        r.read(0, [], buf)
        assert r.last.syscalls == 0
    with pytest.raises(FlashError, match="missing"):
        BundleReader(folder / "nope", cfg)
