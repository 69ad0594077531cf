"""The on-disk flash layout: `flash.json`, `resident.safetensors`, `ffn.bundles`.

`ffn.bundles` is a table of contents you can read like llama2.c's checkpoint:

    layer l starts at  layers[l]["offset"]            (a multiple of PAGE)
    neuron i of l  at  layers[l]["offset"] + i * stride
    one bundle      =  [gate row i | up row i | down column i | biases i | pad | crc32]
                       (quantized: the weight rows first, then their scales and biases)

Each field of a bundle is described in `bundle.fields` (name, byte offset, shape,
dtype), so a reader needs no architecture knowledge. A quantized field is three
entries (`<name>.weight` uint32, `<name>.scales`, `<name>.biases`), one row of an
MLX quantized matrix. The last 4 bytes of every bundle hold the CRC-32 of the
bytes before the padding, so a corrupted bundle is caught by the read that fetches it.
The stride is a multiple of `alignment` so that every bundle can be read with
O_DIRECT into a row of an aligned buffer, and fields whose offset and size are
multiples of it straight into the rows of the window's packed arrays.
"""

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import FlashError

FORMAT_NAME = "mlx-flash"
FORMAT_VERSION = 1
PAGE = 4096  # layer offsets and the file size are page-aligned
DEFAULT_ALIGNMENT = 512  # logical block size of most disks: bundle stride granularity

CONFIG_FILE = "flash.json"
RESIDENT_FILE = "resident.safetensors"
BUNDLES_FILE = "ffn.bundles"

_DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint32": 4, "uint8": 1}  # uint8: mxfp4 scales


def round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


@dataclass
class Field:
    name: str  # "gate", "up", "down", "bias" or "<matrix>.weight|scales|biases" when quantized
    offset: int  # byte offset inside the bundle
    shape: List[int]  # per neuron, e.g. [d_model]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * _DTYPE_SIZES[self.dtype]


@dataclass
class BundleLayout:
    """Geometry of one neuron bundle; the same for every layer of a model."""

    fields: List[Field]
    nbytes: int  # bytes of content, CRC excluded
    stride: int  # bytes between consecutive bundles (content + pad + crc), multiple of alignment
    alignment: int

    @property
    def crc_offset(self) -> int:
        return self.stride - 4

    @property
    def field_bytes(self) -> int:
        """A neuron's bytes in DRAM: its fields packed, without padding and CRC."""
        return sum(f.nbytes for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @classmethod
    def build(cls, d_model: int, glu: bool, bias: bool, dtype: str,
              quantization: Optional[dict] = None, alignment: int = DEFAULT_ALIGNMENT):
        names = (["gate"] if glu else []) + ["up", "down"]
        fields, off = [], 0

        def add(name, shape, dt):
            nonlocal off
            off = round_up(off, 4)  # every field can be viewed as uint32 / float32
            fields.append(Field(name, off, list(shape), dt))
            off += fields[-1].nbytes

        # the large fields first: when their sizes are multiples of the alignment, direct reads can
        # land them straight in the window's packed arrays (flash.bundle_reader.BundleReader.read_into)
        for name in names:
            if quantization:
                bits = quantization.get(f"{name}_bits", quantization["bits"])
                add(f"{name}.weight", [d_model * bits // 32], "uint32")
            else:
                add(name, [d_model], dtype)
        for name in names if quantization else []:
            group = quantization["group_size"]
            add(f"{name}.scales", [d_model // group], dtype)
            add(f"{name}.biases", [d_model // group], dtype)
        if bias:  # per-neuron biases: [gate_bias, up_bias] (GLU) or [up_bias]
            add("bias", [len(names) - 1], dtype)
        nbytes = off
        stride = round_up(round_up(nbytes, 4) + 4, alignment)
        return cls(fields, nbytes, stride, alignment)

    def to_json(self) -> dict:
        return {
            "fields": [f.__dict__ for f in self.fields],
            "nbytes": self.nbytes,
            "stride": self.stride,
            "alignment": self.alignment,
        }

    @classmethod
    def from_json(cls, d: dict):
        return cls([Field(**f) for f in d["fields"]], d["nbytes"], d["stride"], d["alignment"])


def bundle_crc(bundle: np.ndarray, layout: BundleLayout) -> int:
    """CRC-32 of a bundle's content bytes (bundle: uint8 array of at least layout.nbytes)."""
    return zlib.crc32(memoryview(bundle[: layout.nbytes])) & 0xFFFFFFFF


def stored_crc(bundle: np.ndarray, layout: BundleLayout) -> int:
    return struct.unpack_from("<I", bundle, layout.crc_offset)[0]


@dataclass
class FlashConfig:
    """The parsed `flash.json`."""

    architecture: str  # the model type (models/architectures.py)
    model_config: dict  # the model's ModelArgs as a dict (config.json keys)
    d_model: int
    d_ff: int
    n_layers: int
    glu: bool
    bias: bool
    activation: str
    dtype: str
    quantization: Optional[dict]  # bundles' {"bits", "group_size"}, None when float
    layout: BundleLayout
    layers: List[dict]  # per layer: {"offset", "nbytes", "sha256"}
    file_size: int
    source: dict  # where it came from, resident quantization, requantization error
    predictors: Optional[dict] = None  # written by train_predictors
    act_threshold: float = 0.0  # FATReLU's threshold (activation "fatrelu")
    pipeline: Optional[dict] = None  # one rank's folder of a split (mlx_flash.split): rank, ranks, layers, split_id

    def bundle_offset(self, layer: int, neuron: int) -> int:
        return self.layers[layer]["offset"] + neuron * self.layout.stride

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "model_config": self.model_config,
            "ffn": {
                "d_model": self.d_model,
                "d_ff": self.d_ff,
                "n_layers": self.n_layers,
                "glu": self.glu,
                "bias": self.bias,
                "activation": self.activation,
                "act_threshold": self.act_threshold,
                "dtype": self.dtype,
                "quantization": self.quantization,
                "bundle": self.layout.to_json(),
                "layers": self.layers,
                "file_size": self.file_size,
            },
            "source": self.source,
            "predictors": self.predictors,
            **({"pipeline": self.pipeline} if self.pipeline else {}),
        }

    def save(self, folder: Path):
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "FlashConfig":
        path = Path(folder) / CONFIG_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FlashError(f"{folder} is not a flash model: {CONFIG_FILE} is missing")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FlashError(f"{path} is corrupt: {e}")
        if d.get("format") != FORMAT_NAME:
            raise FlashError(f"{path} is not an mlx-flash model description")
        if "experts" in d and "ffn" not in d:  # expert_format.ExpertStore's: load.load_flash reads it
            raise FlashError(f"{folder} is a mixture-of-experts model: its routers pick the experts exactly, so it "
                             f"has no neuron bundles or predictors; run it with generate --mode flash")
        if d.get("format_version") != FORMAT_VERSION:
            raise FlashError(
                f"{path} has format version {d.get('format_version')}, this mlx-flash reads "
                f"version {FORMAT_VERSION}: convert the model again"
            )
        try:
            f = d["ffn"]
            return cls(
                architecture=d["architecture"],
                model_config=d["model_config"],
                d_model=f["d_model"],
                d_ff=f["d_ff"],
                n_layers=f["n_layers"],
                glu=f["glu"],
                bias=f["bias"],
                activation=f["activation"],
                act_threshold=f.get("act_threshold", 0.0),
                dtype=f["dtype"],
                quantization=f["quantization"],
                layout=BundleLayout.from_json(f["bundle"]),
                layers=f["layers"],
                file_size=f["file_size"],
                source=d.get("source", {}),
                predictors=d.get("predictors"),
                pipeline=d.get("pipeline"),
            )
        except (KeyError, TypeError) as e:
            raise FlashError(f"{path} is corrupt: missing or malformed entry {e}")

    def check_files(self, folder: Path):
        """Sizes of the data files match the description (a truncated copy is caught here)."""
        folder = Path(folder)
        for name in (RESIDENT_FILE, BUNDLES_FILE):
            if not (folder / name).is_file():
                raise FlashError(f"{folder} is incomplete: {name} is missing")
        size = (folder / BUNDLES_FILE).stat().st_size
        if size != self.file_size:
            raise FlashError(
                f"{folder / BUNDLES_FILE} is truncated or corrupt: {size} bytes, expected {self.file_size}"
            )


def layer_view(data: np.ndarray, cfg: FlashConfig, layer: int) -> np.ndarray:
    """(d_ff, stride) uint8 view of one layer inside a mapped or loaded ffn.bundles."""
    off = cfg.layers[layer]["offset"]
    n = cfg.d_ff * cfg.layout.stride
    return data[off : off + n].reshape(cfg.d_ff, cfg.layout.stride)


def group_fields(views: dict) -> dict:
    """{field name: (n, ...) array} -> the dict `models.ffn.bundle_ffn` computes on:
    {"gate"|"up"|"down": (n, d) array or (weight, scales, biases), "bias": (n, k)}."""
    out = {}
    for name, v in views.items():
        matrix, _, part = name.partition(".")
        if part:  # quantized: "<matrix>.weight|scales|biases"
            out.setdefault(matrix, {})[part] = v
        else:
            out[name] = v
    return {k: (v["weight"], v["scales"], v["biases"]) if isinstance(v, dict) else v for k, v in out.items()}


def field_arrays(rows, layout: BundleLayout) -> dict:
    """Typed MLX views of bundle fields over a (n, stride) uint8 MLX array of whole bundles.

    The dtype view is taken on whole rows before the field's columns are sliced: the other
    order makes MLX copy. The views are strided (fields interleave in a row), so MLX's
    matmuls copy them when they compute: the flash runtime computes on packed fields
    instead (flash.neuron_cache.NeuronBuffer); this serves dense loading and the baselines.
    """
    import mlx.core as mx

    n = rows.shape[0]
    views = {}
    for f in layout.fields:
        dt = getattr(mx, f.dtype)
        count = int(np.prod(f.shape))
        v = rows.view(dt)[:, f.offset // dt.size : f.offset // dt.size + count]  # (n, count)
        views[f.name] = v if len(f.shape) == 1 else v.reshape(n, *f.shape)
    return group_fields(views)
