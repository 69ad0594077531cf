"""Expert bundles: a mixture-of-experts model in the flash layout, one contiguous extent per routed expert.

    python -m mlx_flash.convert --model Qwen/Qwen3-30B-A3B --out models/qwen3-30b-a3b --quantize 4
    (convert_experts.py writes it; flash/experts.py streams it)

A routed expert is the MoE counterpart of a neuron bundle: a token needs all of it or none of it
(the router says which, exactly), and its gate, up and down projections are read together. So
`experts.bundles` holds, per MoE layer, per expert, one extent of `stride` bytes, aligned for
direct I/O, read with one request:

    expert e of layer l at  layers[l]["offset"] + e * stride     (layers[l] is None for a dense layer)
    one extent            =  [gate_proj.weight | up_proj.weight | down_proj.weight | scales, biases,
                              per-expert biases (gpt-oss) | pad | crc32]

Each field is expert e's slice of mlx-lm's stacked SwitchGLU parameter of that name (`gate_proj.weight`:
(d_ff, d_model) float, or (d_ff, d_model * bits / 32) uint32 with `gate_proj.scales` and `.biases`),
so a slot buffer that stacks extents field by field is a SwitchGLU's weights (flash/experts.py). Fields
whose size is a multiple of the alignment come first, at aligned offsets: direct reads land them in
their slot in place. The last 4 bytes of an extent are the CRC-32 of its content, checked by the read.

Quantization: experts quantized in the source (mlx-community) are copied bit for bit, each expert's
rows being whole rows of the stacked matrix; float experts stay float (`--dtype` casts) or are quantized
at `--quantize` bits along their input dimension as mlx-lm does. Routers, shared experts, dense layers,
attention, norms and embeddings are the resident part (`resident.safetensors`), routers kept as the
source has them (float under `--quantize`, so that routing is not changed).

flash.json: the format of the neuron layout (format.py) with an "experts" entry in place of "ffn".
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from .errors import FlashError
from .format import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, RESIDENT_FILE, BundleLayout, Field, round_up

EXPERTS_FILE = "experts.bundles"
DTYPE_NAMES = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32", mx.uint32: "uint32",
               mx.uint8: "uint8"}  # uint8: mxfp4's scales


def expert_layout(params: Dict[str, mx.array], alignment: int) -> BundleLayout:
    """One extent's fields from a SwitchGLU's stacked parameters {name: (experts, ...)}: the fields whose
    size is a multiple of the alignment first (the weights, in gate, up, down order), at aligned offsets."""
    order = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}
    specs = sorted(((name, list(v.shape[1:]), DTYPE_NAMES[v.dtype]) for name, v in params.items()),
                   key=lambda f: (not f[0].endswith(".weight"), order.get(f[0].split(".")[0], 3), f[0]))
    sized = [Field(name, 0, shape, dtype) for name, shape, dtype in specs]
    aligned = [f for f in sized if f.nbytes % alignment == 0]
    fields, off = [], 0
    for f in aligned + [f for f in sized if f.nbytes % alignment]:
        off = round_up(off, 4)  # every field can be viewed as uint32 / float32
        fields.append(Field(f.name, off, f.shape, f.dtype))
        off += f.nbytes
    return BundleLayout(fields, off, round_up(round_up(off, 4) + 4, alignment), alignment)


@dataclass
class ExpertStore:
    """The parsed flash.json of a mixture-of-experts model."""

    architecture: str
    model_config: dict
    d_model: int
    d_ff: int  # an expert's hidden width
    num_experts: int
    top_k: int
    quantization: Optional[dict]  # the experts' {"bits", "group_size"}, None when float
    dtype: str  # their float dtype (scales and biases when quantized)
    layout: BundleLayout  # one expert's extent
    layers: List[Optional[dict]]  # per model layer: {"offset", "nbytes", "sha256"}, None for a dense layer
    file_size: int
    source: dict

    @property
    def moe_layers(self) -> List[int]:
        return [l for l, e in enumerate(self.layers) if e is not None]

    @property
    def expert_bytes(self) -> int:
        """One expert in memory: its fields packed, without padding and CRC."""
        return self.layout.field_bytes

    def extents(self) -> "Extents":
        return Extents(self.layout, len(self.layers), self.num_experts, self.file_size, self.layers)

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "architecture": self.architecture,
                "model_config": self.model_config,
                "experts": {"d_model": self.d_model, "d_ff": self.d_ff, "num_experts": self.num_experts,
                            "top_k": self.top_k, "quantization": self.quantization, "dtype": self.dtype,
                            "bundle": self.layout.to_json(), "layers": self.layers, "file_size": self.file_size},
                "source": self.source}

    def save(self, folder: Path):
        (Path(folder) / CONFIG_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "ExpertStore":
        path = Path(folder) / CONFIG_FILE
        try:
            d = json.loads(path.read_text())
            e = d["experts"]
            store = cls(d["architecture"], d["model_config"], e["d_model"], e["d_ff"], e["num_experts"], e["top_k"],
                        e["quantization"], e["dtype"], BundleLayout.from_json(e["bundle"]), e["layers"],
                        e["file_size"], d.get("source", {}))
        except FileNotFoundError:
            raise FlashError(f"{folder} is not a flash model: {CONFIG_FILE} is missing")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise FlashError(f"{path} is corrupt: {err}")
        if d.get("format") != FORMAT_NAME or d.get("format_version") != FORMAT_VERSION:
            raise FlashError(f"{path} is not an mlx-flash model of format version {FORMAT_VERSION}: convert it again")
        for name in (RESIDENT_FILE, EXPERTS_FILE):
            if not (Path(folder) / name).is_file():
                raise FlashError(f"{folder} is incomplete: {name} is missing")
        size = (Path(folder) / EXPERTS_FILE).stat().st_size
        if size != store.file_size:
            raise FlashError(f"{Path(folder) / EXPERTS_FILE} is truncated or corrupt: {size} bytes, expected "
                             f"{store.file_size}")
        return store


def is_moe_folder(folder) -> bool:
    """A converted folder whose flash.json describes expert extents (ExpertStore.load then checks its files)."""
    try:
        return "experts" in json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return False  # no flash.json, or a corrupt one: format.FlashConfig.load says which, in one line


@dataclass
class Extents:
    """What flash.bundle_reader.BundleReader reads by (the fields of format.FlashConfig it uses): here a
    layer's "neurons" are its experts, and a "bundle" is an expert's extent."""

    layout: BundleLayout
    n_layers: int
    d_ff: int  # experts per layer
    file_size: int
    layers: List[Optional[dict]]

    def bundle_offset(self, layer: int, expert: int) -> int:
        return self.layers[layer]["offset"] + expert * self.layout.stride
