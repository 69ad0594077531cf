"""Synthetic `ffn.bundles` files and a folder where direct I/O really works.

    cfg, bundles = write_flash_model(folder, quantization={"bits": 4, "group_size": 32})
    bundles[l, i]   # (stride,) uint8: the exact bytes of neuron i of layer l on disk

O_DIRECT needs a disk-backed filesystem: pytest's tmp_path is on /tmp, which is
tmpfs on many machines, so `direct_root` probes tmp_path, then /var/tmp, then
this folder, and uses the first where a direct read succeeds.
"""

import mmap
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from mlx_flash.flash.bundle_reader import open_direct
from mlx_flash.errors import FlashError
from mlx_flash.format import BUNDLES_FILE, PAGE, BundleLayout, FlashConfig, round_up

_NP = {"float16": np.float16, "float32": np.float32}


def write_flash_model(folder, d_model=64, d_ff=256, n_layers=3, glu=True, bias=True, dtype="float16",
                      quantization=None, alignment=512, seed=0):
    """Write flash.json + ffn.bundles with random fields and correct CRCs.

    Returns (cfg, bundles) with bundles (n_layers, d_ff, stride) uint8.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lay = BundleLayout.build(d_model, glu, bias, dtype, quantization, alignment)
    rng = np.random.default_rng(seed)
    bundles = np.zeros((n_layers, d_ff, lay.stride), dtype=np.uint8)
    for f in lay.fields:
        count = int(np.prod(f.shape))
        if f.dtype == "uint32":
            vals = rng.integers(0, 2**32, (n_layers, d_ff, count), dtype=np.uint32)
        elif f.dtype == "bfloat16":  # the top half of a float32
            vals = (rng.standard_normal((n_layers, d_ff, count)).astype(np.float32).view(np.uint32) >> 16)
            vals = vals.astype(np.uint16)
        else:
            vals = rng.standard_normal((n_layers, d_ff, count)).astype(_NP[f.dtype])
        bundles[:, :, f.offset : f.offset + f.nbytes] = vals.view(np.uint8)
    crc = np.array([[zlib.crc32(b[: lay.nbytes]) for b in layer] for layer in bundles], dtype="<u4")
    bundles[:, :, lay.crc_offset :] = crc[..., None].view(np.uint8)

    layers, off = [], 0
    for _ in range(n_layers):
        off = round_up(off, PAGE)
        layers.append({"offset": off, "nbytes": d_ff * lay.stride, "sha256": None})
        off += d_ff * lay.stride
    file_size = round_up(off, PAGE)
    data = np.zeros(file_size, dtype=np.uint8)
    for l, info in enumerate(layers):
        data[info["offset"] : info["offset"] + info["nbytes"]] = bundles[l].reshape(-1)
    data.tofile(folder / BUNDLES_FILE)
    cfg = FlashConfig(
        architecture="llama", model_config={}, d_model=d_model, d_ff=d_ff, n_layers=n_layers,
        glu=glu, bias=bias, activation="silu" if glu else "relu", dtype=dtype,
        quantization=quantization, layout=lay, layers=layers, file_size=file_size, source={},
    )
    cfg.save(folder)
    return cfg, bundles


def direct_io_works(folder: Path) -> bool:
    probe = folder / "probe.bin"
    probe.write_bytes(os.urandom(PAGE))
    try:
        fd = open_direct(probe)
    except FlashError:
        return False
    try:
        buf = mmap.mmap(-1, PAGE)  # page-aligned
        return os.preadv(fd, [buf], 0) == PAGE and buf[:] == probe.read_bytes()
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture(scope="session")
def direct_root(tmp_path_factory):
    """A fresh folder on a filesystem where direct reads work (removed afterwards)."""
    for base in (tmp_path_factory.getbasetemp(), Path("/var/tmp"), Path(__file__).parent):
        try:
            d = Path(tempfile.mkdtemp(prefix=".flash-direct-", dir=base))
        except OSError:
            continue
        if direct_io_works(d):
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
        shutil.rmtree(d, ignore_errors=True)
    pytest.skip("no filesystem here supports direct I/O")


def decode(model, ids, n_new):
    """Prompt pass, then greedy decoding one token at a time: (all logits, new tokens)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array(ids)[None], cache=cache)[0]]
    toks = []
    for _ in range(n_new):
        toks.append(out[-1][-1].argmax().item())
        out.append(model(mx.array([[toks[-1]]]), cache=cache)[0])
    return np.array(mx.concatenate(out).astype(mx.float32)), toks
