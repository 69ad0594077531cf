"""`load()`: one entry point for every model source and every FFN mode.

    model, tokenizer = load("smollm2-135m")                       # the source, dense
    model, tokenizer = load("models/smollm2-135m", mode="dense")  # converted, FFN read from bundles
    model, tokenizer = load("models/smollm2-135m", mode="flash", dram_budget=0.6)
    model, tokenizer = load("smollm2-135m", mode="flash")  # its copy in models/ (mlx_flash.prepare)

The model is an mlx-lm-compatible nn.Module (`layers`, `__call__(inputs, cache)`),
so mlx-lm's generation loop, samplers and KV cache drive it. Only the FFN
provider differs between modes.
"""

import hashlib
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import FlashError
from .expert_format import is_moe_folder
from .flash.attach import attach_flash
from .flash.expert_attach import load_experts
from .flash.bundle_reader import BundleBuffer, BundleReader
from .format import (
    BUNDLES_FILE,
    CONFIG_FILE,
    RESIDENT_FILE,
    FlashConfig,
    field_arrays,
    layer_view,
)
from .models.ffn import BundleFFN
from .sources import (
    BUILTIN_MODELS,
    build_model,
    default_folder,
    load_tokenizer,
    instantiate,
    mismatch,
    quantize_like,
    read_source,
    resolve,
)
from .system import release_pages

MODES = ("dense", "flash")
_DOWN_BIAS = re.compile(r"layers\.(\d+)\.mlp\.down_proj\.bias$")


def is_flash_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def load_resident(folder: Path, cfg: FlashConfig):
    """The model with everything but the FFN loaded; returns (model, per-layer down biases)."""
    model = instantiate(cfg.model_config)
    for layer in model.layers:
        layer.mlp = nn.Module()  # the FFN provider is attached by the mode
    try:
        weights = mx.load(str(folder / RESIDENT_FILE))
    except Exception as e:
        raise FlashError(f"{folder / RESIDENT_FILE} is corrupt: {e}")
    down_bias = [None] * cfg.n_layers
    for k in [k for k in weights if _DOWN_BIAS.search(k)]:
        down_bias[int(_DOWN_BIAS.search(k).group(1))] = weights.pop(k)
    if hasattr(model, "sanitize"):  # some classes decide their shape there (Gemma 3: a tied LM head)
        weights = model.sanitize(weights)
    quantize_like(model, weights, cfg.model_config.get("quantization"))
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise FlashError(f"{folder / RESIDENT_FILE} does not match flash.json: {mismatch(e)}")
    # evaluate everything now: a lazy load left for later would belong to this thread's stream,
    # and a server generates from other threads
    mx.eval(model.parameters(), [b for b in down_bias if b is not None])
    release_pages(folder / RESIDENT_FILE)  # in MLX's memory now: a cached copy would count twice
    model.eval()
    return model, down_bias


def read_all_bundles(folder: Path, cfg: FlashConfig, verify: bool = True) -> np.ndarray:
    """The whole ffn.bundles in memory (dense mode), each layer checked against its SHA-256."""
    data = np.fromfile(folder / BUNDLES_FILE, dtype=np.uint8)
    if data.size != cfg.file_size:
        raise FlashError(f"{folder / BUNDLES_FILE} is truncated or corrupt: {data.size} bytes, expected {cfg.file_size}")
    if verify:
        for l in range(cfg.n_layers):
            if hashlib.sha256(layer_view(data, cfg, l)).hexdigest() != cfg.layers[l]["sha256"]:
                raise FlashError(f"{folder / BUNDLES_FILE} is corrupt: checksum mismatch in layer {l}")
    return data


def _bundle_ffn(rows: mx.array, cfg: FlashConfig, spec, down_bias) -> BundleFFN:
    """A dense FFN over one layer's (d_ff, stride) bundle rows, its fields copied packed (MLX copies
    strided operands at every matmul otherwise)."""
    fields = {k: tuple(map(mx.contiguous, v)) if isinstance(v, tuple) else mx.contiguous(v)
              for k, v in field_arrays(rows, cfg.layout).items()}
    return BundleFFN(spec, fields, down_bias, cfg.quantization)


def attach_dense(model, folder: Path, cfg: FlashConfig, down_bias):
    data = read_all_bundles(folder, cfg)
    for l, layer in enumerate(model.layers):
        rows = mx.array(layer_view(data, cfg, l))  # (d_ff, stride) bytes, copied once
        layer.mlp = _bundle_ffn(rows, cfg, model.ffn_spec, down_bias[l])
    mx.eval(model.parameters())


class LayerLoader:
    """Dense FFNs read one layer at a time into one reused buffer: `loader(l)` reads layer l, checks
    its SHA-256 and returns its FFN, valid until the next call. Calibration uses it to run a model
    whose FFNs do not fit in memory together.

    Reads bypass the page cache where the filesystem allows (each byte is read once)."""

    def __init__(self, folder: Path, cfg: FlashConfig, spec, down_bias, threads: int = 4):
        self.cfg, self.spec, self.down_bias = cfg, spec, down_bias
        self.buf = BundleBuffer(cfg.d_ff, cfg.layout)
        try:
            self.reader = BundleReader(folder, cfg, threads=threads, direct=True)
        except FlashError:  # a filesystem in memory, say: buffered reads, dropped from the cache after
            self.reader = BundleReader(folder, cfg, threads=threads, direct=False)

    def __call__(self, l: int) -> BundleFFN:
        self.reader.read_layer_all(l, self.buf)
        if not self.reader.direct:
            release_pages(self.reader.path)
        if hashlib.sha256(self.buf.np).hexdigest() != self.cfg.layers[l]["sha256"]:
            raise FlashError(f"{self.reader.path} is corrupt: checksum mismatch in layer {l}")
        ffn = _bundle_ffn(self.buf.mx, self.cfg, self.spec, self.down_bias[l])
        mx.eval(ffn.parameters())
        return ffn

    def close(self):
        self.reader.close()


def load_flash(folder, mode: str = "dense", **flash_options):
    """Load a converted model folder; returns (model, FlashConfig), or (model, ExpertStore) for a mixture
    of experts."""
    folder = Path(folder)
    if is_moe_folder(folder):  # a mixture of experts: its experts streamed whole (flash/expert_attach.py)
        model, store = load_experts(folder, mode, **flash_options)
        model.flash_config = store
        return model, store
    cfg = FlashConfig.load(folder)
    if cfg.pipeline:  # one rank's layers of a split (mlx_flash.split)
        p = cfg.pipeline
        raise FlashError(f"{folder} holds rank {p['rank']} of {p['ranks']}'s layers only: run all ranks with python -m "
                         f"mlx_flash.launch --ranks {p['ranks']} -- generate --model {str(folder).rsplit('-rank', 1)[0]} "
                         f"--mode {mode} --pipeline")
    cfg.check_files(folder)
    model, down_bias = load_resident(folder, cfg)
    if mode == "dense":
        attach_dense(model, folder, cfg, down_bias)
    elif mode == "flash":
        attach_flash(model, folder, cfg, down_bias, **flash_options)
    else:
        raise FlashError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    model.flash_config = cfg
    return model, cfg


def load(model: str, mode: str = "dense", **flash_options):
    """Returns (model, tokenizer) for a built-in name, GGUF, HF folder, Hub id or flash folder."""
    if mode not in MODES:
        raise FlashError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    if model in BUILTIN_MODELS and mode == "flash":
        if not is_flash_folder(default_folder(model)):
            raise FlashError(f"flash mode needs the converted, calibrated copy of {model}: the commands prepare it "
                             f"on first use, Python with mlx_flash.prepare.prepare('{model}')")
        model = str(default_folder(model))
    path = resolve(model)
    if is_flash_folder(path):
        net, _ = load_flash(path, mode, **flash_options)
        return net, load_tokenizer(path)
    if mode != "dense":
        raise FlashError(
            f"{mode} mode needs a converted model: run `python -m mlx_flash.convert --model {model} --out DIR` "
            f"and pass --model DIR"
        )
    src = read_source(model)
    return build_model(src.config, src.weights), load_tokenizer(src.tokenizer_dir)
