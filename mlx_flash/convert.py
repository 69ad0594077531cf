"""Convert a model into the flash layout: resident.safetensors + ffn.bundles + flash.json.

    python -m mlx_flash.convert --model smollm2-135m --out models/smollm2-135m

Row-column bundling (paper section 3.2): neuron i of a layer needs gate row i,
up row i and down column i, so they are stored side by side and one read
fetches the neuron. Down columns are not contiguous in a row-quantized matrix,
so quantized bundles hold the transposed down projection, requantized along
d_model; the error this adds is measured and stored in flash.json.

Conversion works one layer at a time: the source's safetensors are read lazily, one
tensor when it is used, and each FFN layer is freed once its bundles are written, so
memory holds the resident part and one FFN layer (--dram-budget is checked against that).
"""

import argparse
import hashlib
import os
import shutil
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .errors import FlashError, cli
from .format import (
    BUNDLES_FILE,
    DEFAULT_ALIGNMENT,
    PAGE,
    RESIDENT_FILE,
    BundleLayout,
    FlashConfig,
    round_up,
)
from .flash.budget import check_prepare, returning_freed_memory
from .models.architectures import architecture
from .models.in_out import LAYOUT_KEY, LAYOUTS, default_layout, in_out_paths, tied, to_in_out
from .sources import build_model, copy_tokenizer, default_folder, read_source, resolve
from .system import release_pages

GGUF_WHOLE = "the GGUF file (MLX reads it whole)"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _rows_bytes(a: mx.array) -> np.ndarray:
    """(n, ...) array -> (n, nbytes) uint8, whatever the dtype (numpy has no bfloat16)."""
    return np.array(a.view(mx.uint8)).reshape(a.shape[0], -1)


ROWS = 256  # matrix rows per MLX op while bundling: MLX's CPU dequantize and quantize make float32
# temporaries several times their output (measured: 22 MB of peak for a 4 MB dequantized matrix)


def _by_rows(f, *arrays):
    """f over blocks of ROWS rows of `arrays` (arrays or quantized triples), each evaluated before the
    next, concatenated: f's temporaries are those of one block."""
    n = (arrays[0][0] if isinstance(arrays[0], tuple) else arrays[0]).shape[0]
    block = lambda a, i: tuple(x[i : i + ROWS] for x in a) if isinstance(a, tuple) else a[i : i + ROWS]
    parts = []
    for i in range(0, n, ROWS):
        out = f(*(block(a, i) for a in arrays))
        mx.eval(out)
        parts.append(out)
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(p) for p in zip(*parts))
    return mx.concatenate(parts)


def _float_rows(w, q, dtype, transpose: bool) -> mx.array:
    """The source matrix in the bundles' float dtype (transposed: the down projection, so that neuron
    i's column becomes row i), one block of rows at a time."""
    dense = _by_rows(lambda b: (mx.dequantize(*b, group_size=q["group_size"], bits=q["bits"]) if q else b)
                     .astype(dtype), w)
    return _by_rows(lambda b: b, dense.T) if transpose else dense  # blocks of the transpose: packed rows


def _relative_error(fields, dense, group_size: int, bits: int) -> float:
    def sums(f, d):
        back = mx.dequantize(*f, group_size=group_size, bits=bits).astype(mx.float32)
        return mx.stack([mx.sum((back - d.astype(mx.float32)) ** 2), mx.sum(d.astype(mx.float32) ** 2)])[None]

    err, ref = np.array(_by_rows(sums, fields, dense)).sum(axis=0)
    return float(np.sqrt(err / ref))


def ffn_fields(mlp, glu: bool, quant, dtype):
    """Bundle fields of one layer: {name: (d_ff, d_model) array or quantized triple}, and the relative
    error of each matrix quantized here ({name: error}), measured against the source's own weights.

    quant: bundles' {"bits", "group_size"} or None for float bundles of `dtype`. Gate and up rows of a
    source quantized the same way are copied bit for bit; the down projection's columns are quantized
    along d_model here whatever the source (a row-quantized matrix's columns are not contiguous).
    """
    fields, errors, biases = {}, {}, []
    for name in (["gate"] if glu else []) + ["up", "down"]:
        w, bias, src_q = mlp.matrix(name)
        if name != "down":
            biases.append(bias)
        if name != "down" and quant is not None and src_q == {k: quant[k] for k in ("bits", "group_size")}:
            fields[name] = w  # rows of a row-quantized gate/up are already bundles: copy bits exactly
            continue
        dense = _float_rows(w, src_q, dtype, transpose=name == "down")
        if quant is None:
            fields[name] = dense
            continue
        bits = quant.get(f"{name}_bits", quant["bits"])
        fields[name] = _by_rows(lambda b: tuple(mx.quantize(b, group_size=quant["group_size"], bits=bits)), dense)
        if name == "down" or src_q is not None:  # a float gate/up quantized by --quantize is not a requantization
            errors[name] = _relative_error(fields[name], dense, quant["group_size"], bits)
        del dense
    if mlp.spec.bias:
        fields["bias"] = mx.stack(biases, axis=1).astype(dtype)  # (d_ff, 2) or (d_ff, 1)
    return fields, errors


def requantization_report(errors: list) -> dict:
    """flash.json's record of what quantizing the bundles here cost: per matrix, per layer."""
    down = [e["down"] for e in errors if "down" in e]
    out = {}
    if down:
        out.update({"down_relative_error_mean": float(np.mean(down)), "down_relative_error_max": float(np.max(down)),
                    "per_layer": [round(e, 6) for e in down]})
    for name in ("gate", "up"):  # a source whose groups or bits differ from the bundles' in some layers
        layers = {l: e[name] for l, e in enumerate(errors) if name in e}
        if layers:
            out[f"{name}_requantized"] = {str(l): round(v, 6) for l, v in layers.items()}
    return out or None


def pack_layer(fields: dict, layout: BundleLayout, d_ff: int) -> np.ndarray:
    """(d_ff, stride) uint8: one bundle per row, CRC-32 of its content in the last 4 bytes."""
    out = np.zeros((d_ff, layout.stride), dtype=np.uint8)
    flat = {}
    for name, v in fields.items():
        if isinstance(v, tuple):
            flat.update({f"{name}.weight": v[0], f"{name}.scales": v[1], f"{name}.biases": v[2]})
        else:
            flat[name] = v
    for f in layout.fields:
        out[:, f.offset : f.offset + f.nbytes] = _rows_bytes(flat[f.name])
    crcs = [zlib.crc32(row) & 0xFFFFFFFF for row in out[:, : layout.nbytes]]
    out[:, layout.crc_offset :] = np.array(crcs, dtype="<u4").view(np.uint8).reshape(d_ff, 4)
    return out


def layer_bytes(net, spec, layout: BundleLayout, mx_dtype, copied: int = 0) -> int:
    """What bundling one FFN layer holds at once: its source matrices, float copies in the bundles'
    dtype of those not `copied` bit for bit (the down projection twice: before and after its transpose),
    a block's float32 temporaries (ROWS), and the packed bundles with one field's bytes on the way
    (the peak of a 12-layer 4-bit model with 3 x 1024 x 2048 FFNs was 19 MB for a 43 MB budget here)."""
    source = sum(v.nbytes for _, v in tree_flatten(net.layers[0].mlp.parameters()))
    floats = ((3 if spec.glu else 2) - copied + 1) * spec.d_ff * spec.d_model * mx_dtype.size
    block = 3 * ROWS * max(spec.d_ff, spec.d_model) * 4  # measured: 2.75x a block's float32 size
    return source + floats + block + spec.d_ff * (layout.stride + max(f.nbytes for f in layout.fields))


def convert(model: str, out: Path, dtype: str = None, quantize: int = None, group_size: int = None,
            down_bits: int = None, alignment: int = DEFAULT_ALIGNMENT, dram_budget=None, quiet: bool = False,
            resident_layout: str = None) -> Path:
    """Convert layer by layer: memory holds the resident part and one FFN layer, whatever the number of
    layers (safetensors are read lazily, one tensor at a time). dram_budget: checked up front.
    resident_layout: how --quantize stores the resident matrices (models/in_out.py; default: the
    faster one on this machine's default device)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FlashError(f"{out} already exists: remove it or choose another --out")
    if dtype is not None and dtype not in DTYPES:
        raise FlashError(f"--dtype must be one of {', '.join(DTYPES)}")
    if quantize not in (None, 4, 8):
        raise FlashError("--quantize must be 4 or 8")
    if alignment < 512 or alignment & (alignment - 1):
        raise FlashError("--align must be a power of two of at least 512")
    if resident_layout not in (None, *LAYOUTS):
        raise FlashError(f"--resident-layout must be one of {', '.join(LAYOUTS)}")

    path = resolve(model)
    if path.suffix == ".gguf":  # checked before MLX reads it
        size = path.stat().st_size
        check_prepare("convert this model", dram_budget, size, {GGUF_WHOLE: size})
    src = read_source(model)
    if architecture(src.config).moe is not None:  # routed experts: one extent per expert, not neuron bundles
        if down_bits or resident_layout:
            raise FlashError("--down-bits and --resident-layout apply to neuron bundles, not to a mixture of experts")
        from .convert_experts import convert_experts

        return convert_experts(src, out, dtype, quantize, group_size, alignment, dram_budget, quiet)
    net = build_model(src.config, src.weights, lazy=True)
    src.weights = None  # the model holds the only reference: a layer's FFN is freed once bundled
    spec = net.ffn_spec
    total = sum(v.nbytes for _, v in tree_flatten(net.parameters()))  # the source's size
    config = dict(src.config)
    src_w, _, src_q = net.layers[0].mlp.matrix("up")

    # Bundles keep the source's quantization unless a dtype or a new quantization is asked for.
    dtype_given = dtype is not None
    src_float = DTYPE_NAMES.get(src_w[1].dtype if src_q else src_w.dtype, "float16")
    dtype = dtype or src_float
    mx_dtype = DTYPES[dtype]
    if quantize:
        group_size = group_size or (64 if spec.d_model % 64 == 0 else 32)
        quant = {"bits": quantize, "group_size": group_size}
    elif src_q and not dtype_given:
        # Down columns must be requantized anyway; at 8 bits the error is ~10x smaller than at 4,
        # and a 4-bit bundle's stride is padded to the alignment, so it usually costs no I/O.
        quant = dict(src_q, down_bits=down_bits or max(8, src_q["bits"]))
    else:
        quant = None
    if quant and down_bits:
        quant["down_bits"] = down_bits
    if quant and quant.get("down_bits") not in (None, 2, 3, 4, 5, 6, 8):
        raise FlashError("--down-bits must be one of 2, 3, 4, 5, 6, 8")
    if quant and spec.d_model % quant["group_size"]:
        raise FlashError(f"d_model {spec.d_model} is not a multiple of the group size {quant['group_size']}")

    # Resident part: everything but the FFN matrices; quantized or cast as asked.
    if quantize:
        g = quant["group_size"]
        q = {"group_size": g, "bits": quant["bits"]}
        q.update({k: v for k, v in (src.config.get("quantization") or {}).items() if isinstance(v, dict)})
        if (resident_layout or default_layout()) == "in-out":
            # the matrices a decode step multiplies by, stored for x @ W (the ones already quantized stay)
            paths = in_out_paths(net, tied(net), g)
            to_in_out(net, paths, g, quant["bits"])
            q[LAYOUT_KEY] = paths
        nn.quantize(net, g, quant["bits"], class_predicate=lambda p, m: (
            hasattr(m, "to_quantized") and ".mlp." not in p and not hasattr(m, "scales")
            and m.weight.shape[-1] % g == 0))
        config["quantization"] = q
    resident = {}
    for k, v in tree_flatten(net.parameters()):
        if ".mlp." in k and not k.endswith("down_proj.bias"):
            continue
        if v.dtype in (mx.float16, mx.bfloat16, mx.float32) and (quantize or dtype_given) \
                and not k.endswith("norm.weight"):
            v = v.astype(mx_dtype)
        resident[k] = v

    layout = BundleLayout.build(spec.d_model, spec.glu, spec.bias, dtype, quant, alignment)
    # gate and up rows quantized as the bundles are copied, not made float (ffn_fields)
    copied = (2 if spec.glu else 1) if quant and src_q == {k: quant[k] for k in ("bits", "group_size")} else 0
    n_layers = len(net.layers)
    parts = {"resident weights": sum(v.nbytes for v in resident.values()),
             "one FFN layer": layer_bytes(net, spec, layout, mx_dtype, copied)}
    if path.suffix == ".gguf":  # its resident part and every layer are in memory from the start
        parts = {GGUF_WHOLE: path.stat().st_size, "one FFN layer": parts["one FFN layer"]}
    budget = check_prepare("convert this model", dram_budget, total, parts)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        layers, errors, offset = [], [], 0
        with open(tmp / BUNDLES_FILE, "wb") as f, returning_freed_memory(budget is not None):
            for l, layer in enumerate(tqdm(net.layers, desc="bundling FFN layers", unit="layer",
                                            disable=quiet)):
                fields, err = ffn_fields(layer.mlp, spec.glu, quant, mx_dtype)
                data = pack_layer(fields, layout, spec.d_ff)
                del fields
                layer.mlp = nn.Module()  # bundled: its source weights go
                f.seek(offset)
                f.write(data)
                f.flush()
                layers.append({"offset": offset, "nbytes": data.nbytes, "sha256": hashlib.sha256(data).hexdigest()})
                errors.append(err)
                offset = round_up(offset + data.nbytes, PAGE)
                del data
                for path in [tmp / BUNDLES_FILE, *src.files]:  # each byte is read or written once
                    release_pages(path)
            f.truncate(offset)
        del net, layer  # the resident weights below are the last references to what is left
        mx.save_safetensors(str(tmp / RESIDENT_FILE), resident, metadata={"format": "mlx-flash"})
        copy_tokenizer(src.tokenizer_dir, tmp)
        requant = requantization_report(errors)
        cfg = FlashConfig(
            architecture=config["model_type"], model_config=config, d_model=spec.d_model, d_ff=spec.d_ff,
            n_layers=n_layers, glu=spec.glu, bias=spec.bias, activation=spec.activation, dtype=dtype,
            quantization=quant, layout=layout, layers=layers, file_size=offset,
            source={"model": model, "requantization": requant}, act_threshold=spec.act_threshold,
        )
        cfg.save(tmp)  # written last: a folder without flash.json is not a model
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        size = offset + (out / RESIDENT_FILE).stat().st_size
        print(f"wrote {out}: {n_layers} layers x {spec.d_ff} bundles of {layout.stride} bytes "
              f"({offset / 1e6:.1f} MB on flash, {size / 1e6:.1f} MB in all)")
        if requant:
            print(f"down projection requantized along d_model: relative error "
                  f"{requant['down_relative_error_mean']:.4f} (mean), {requant['down_relative_error_max']:.4f} (max)")
        for name in ("gate", "up"):
            if f"{name}_requantized" in (requant or {}):
                errs = requant[f"{name}_requantized"]
                print(f"{name} rows requantized to the bundles' {quant['bits']} bits, group {quant['group_size']} in "
                      f"{len(errs)} layers whose source differs: relative error {max(errs.values()):.4f} (max)")
    return out


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Convert a model into the mlx-flash layout.")
    p.add_argument("--model", "-M", required=True, help="built-in name, GGUF file, HF folder or Hub id")
    p.add_argument("--out", "-o", default=None, help="output folder (default: models/<name>)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="float type of the bundles (default: the source's)")
    p.add_argument("--quantize", "-q", type=int, choices=[4, 8], default=None, help="quantize to 4 or 8 bits")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (default 64, or 32)")
    p.add_argument("--down-bits", type=int, default=None,
                   help="bits of the requantized down columns (default: --quantize, or 8 for a quantized source)")
    p.add_argument("--resident-layout", choices=LAYOUTS, default=None,
                   help="with --quantize: store attention and the LM head (out, in) for Metal's fast kernel or "
                        "(in, out) for MLX's CPU backend (default: the faster on this machine's default device)")
    p.add_argument("--align", type=int, default=DEFAULT_ALIGNMENT,
                   help="bundle stride alignment in bytes (the disk's logical block size or a multiple)")
    p.add_argument("--dram-budget", default=None,
                   help="memory the conversion may use (e.g. 8G, or a share of the model: 0.5, 60%%): checked "
                        "up front against the resident part plus one FFN layer")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    out = args.out or default_folder(args.model)
    convert(args.model, out, args.dtype, args.quantize, args.group_size, args.down_bits, args.align, args.dram_budget,
            resident_layout=args.resident_layout)


if __name__ == "__main__":
    main()
