"""Convert a mixture-of-experts model: resident.safetensors + experts.bundles + flash.json (expert_format.py).

convert.convert hands a source whose architecture routes to experts (models/architectures.py's `moe`)
to `convert_experts`: layer by layer, each MoE layer's experts are read (lazily, from the source's
safetensors), packed into one aligned extent per expert with its CRC-32, written and freed before the
next layer, so memory holds the resident part and one layer's experts (--dram-budget is checked
against that). Routers, shared experts, dense layers, attention, norms and embeddings are resident.
"""

import hashlib
import os
import shutil
import zlib
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from .errors import FlashError
from .expert_format import DTYPE_NAMES, EXPERTS_FILE, ExpertStore, expert_layout
from .flash.budget import check_prepare, returning_freed_memory
from .format import PAGE, RESIDENT_FILE, BundleLayout, round_up
from .models.architectures import architecture, moe_blocks
from .sources import Source, build_model, copy_tokenizer
from .system import release_pages

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def _quantization(lin) -> Optional[dict]:
    """A (Quantized)SwitchLinear's quantization as flash.json keeps it: {"bits", "group_size"[, "mode"]}."""
    if "scales" not in lin:
        return None
    mode = getattr(lin, "mode", "affine")
    return {"bits": lin.bits, "group_size": lin.group_size, **({"mode": mode} if mode != "affine" else {})}


def _expert_fields(switch, quant: Optional[dict], dtype, requantized: Optional[dict] = None) -> Dict[str, mx.array]:
    """{field name: (experts, ...) array} of one layer's SwitchGLU as the extents store them: copied when
    the source is quantized as the extents are, else made float (dequantized) and cast or quantized.
    requantized: filled with {projection: relative error} where a quantized source is quantized anew."""
    out = {}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(switch, proj)
        src_q = _quantization(lin)
        if "bias" in lin:
            out[f"{proj}.bias"] = lin.bias.astype(dtype)
        if src_q is not None and src_q == quant:  # whole rows of the stacked matrix: bits copied
            out.update({f"{proj}.{k}": lin[k] for k in ("weight", "scales", "biases") if lin.get(k) is not None})
            continue
        w = lin.weight if src_q is None else mx.dequantize(lin.weight, lin.scales, lin.get("biases"), **src_q)
        if quant is None:
            out[f"{proj}.weight"] = w.astype(dtype)
            continue
        q, s, b = mx.quantize(w.astype(mx.float32), quant["group_size"], quant["bits"])  # along the input dim
        out.update({f"{proj}.weight": q, f"{proj}.scales": s.astype(dtype), f"{proj}.biases": b.astype(dtype)})
        if src_q is not None and requantized is not None:  # another quantization in the source: its cost
            back = mx.dequantize(q, s.astype(dtype), b.astype(dtype), **quant).astype(mx.float32)
            w = w.astype(mx.float32)
            requantized[proj] = float(mx.sqrt(mx.sum((back - w) ** 2) / mx.sum(w ** 2)).item())
    return out


def pack_extents(fields: Dict[str, mx.array], layout: BundleLayout, experts: int) -> np.ndarray:
    """(experts, stride) uint8: one extent per row, the CRC-32 of its content in its last 4 bytes."""
    out = np.zeros((experts, layout.stride), dtype=np.uint8)
    for f in layout.fields:
        out[:, f.offset : f.offset + f.nbytes] = np.array(fields[f.name].view(mx.uint8)).reshape(experts, -1)
    crcs = [zlib.crc32(row) & 0xFFFFFFFF for row in out[:, : layout.nbytes]]
    out[:, layout.crc_offset :] = np.array(crcs, dtype="<u4").view(np.uint8).reshape(experts, 4)
    return out


def convert_experts(src: Source, out: Path, dtype: Optional[str], quantize: Optional[int], group_size: Optional[int],
                    alignment: int, dram_budget=None, quiet: bool = False) -> Path:
    """convert.convert for a mixture of experts (src: sources.Source): layer by layer, each MoE layer's
    experts read, packed into extents and freed before the next; written atomically."""
    net = build_model(src.config, src.weights, lazy=True)
    src.weights = None  # the model holds the only reference: a layer's experts are freed once written
    moe = architecture(src.config).moe
    config = dict(src.config)
    blocks = moe_blocks(net)
    if not blocks:
        raise FlashError(f"{src.name} has no routed experts in any layer")
    paths = {id(m): p for p, m in net.named_modules()}
    switch_paths = {l: paths[id(getattr(b, moe.switch))] for l, b in blocks.items()}
    routers = {paths[id(getattr(b, moe.router))] for b in blocks.values()}
    total = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    first = getattr(blocks[min(blocks)], moe.switch).gate_proj
    src_q = _quantization(first)
    floats = [v.dtype for _, v in tree_flatten(getattr(blocks[min(blocks)], moe.switch).parameters())
              if v.dtype in DTYPES.values()]  # mxfp4's scales are uint8: the biases say then
    float_src = floats[0] if floats else mx.float16
    mx_dtype = DTYPES[dtype] if dtype else float_src
    if quantize:
        g = group_size or 64
        d_model, d_ff = net.ffn_spec.d_model, net.ffn_spec.d_ff
        if d_model % g or d_ff % g:
            raise FlashError(f"--group-size {g} must divide d_model {d_model} and the experts' width {d_ff}")
        quant = {"bits": quantize, "group_size": g}
    else:
        quant = None if dtype else src_q  # --dtype alone makes float experts

    # the resident part: everything but the routed experts (routers, shared experts, dense layers, attention)
    is_expert = lambda k: any(k.startswith(p + ".") for p in switch_paths.values())
    if quantize:
        nn.quantize(net, quant["group_size"], quant["bits"], class_predicate=lambda p, m: (
            hasattr(m, "to_quantized") and not is_expert(p + ".") and p not in routers and not hasattr(m, "scales")
            and m.weight.shape[-1] % quant["group_size"] == 0))
        config["quantization"] = {**{k: v for k, v in (src.config.get("quantization") or {}).items()
                                     if isinstance(v, dict)}, **quant}
    resident = {}
    for k, v in tree_flatten(net.parameters()):
        if is_expert(k):
            continue
        if dtype and v.dtype in (mx.float16, mx.bfloat16, mx.float32) and not k.endswith("norm.weight"):
            v = v.astype(mx_dtype)
        resident[k] = v

    layout = expert_layout(_expert_fields(getattr(blocks[min(blocks)], moe.switch), quant, mx_dtype), alignment)
    experts = src.config[moe.experts]
    layer_source = sum(v.nbytes for _, v in tree_flatten(getattr(blocks[min(blocks)], moe.switch).parameters()))
    parts = {"resident weights": sum(v.nbytes for v in resident.values()),
             "one MoE layer's experts": 2 * layer_source + 2 * experts * layout.stride}  # source, float, packed
    check_prepare("convert this model", dram_budget, total, parts)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        layers, offset, requantized = [None] * len(net.layers), 0, {}
        with open(tmp / EXPERTS_FILE, "wb") as f, returning_freed_memory(dram_budget is not None):
            for l in tqdm(sorted(blocks), desc="writing expert extents", unit="layer", disable=quiet):
                errors = {}
                fields = _expert_fields(getattr(blocks[l], moe.switch), quant, mx_dtype, errors)
                mx.eval(fields)
                if errors and src_q is not None and not quantize:  # a layer quantized unlike the first
                    requantized[str(l)] = {k: round(v, 6) for k, v in errors.items()}
                if expert_layout(fields, alignment) != layout:
                    raise FlashError(f"layer {l}'s experts are stored unlike layer {min(blocks)}'s (another "
                                     f"quantization): pass --quantize to store every layer alike")
                data = pack_extents(fields, layout, experts)
                del fields
                setattr(blocks[l], moe.switch, nn.Module())  # written: its source weights go
                f.seek(offset)
                f.write(data)
                f.flush()
                layers[l] = {"offset": offset, "nbytes": data.nbytes, "sha256": hashlib.sha256(data).hexdigest()}
                offset = round_up(offset + data.nbytes, PAGE)
                del data
                for p in [tmp / EXPERTS_FILE, *src.files]:  # each byte is read or written once
                    release_pages(p)
            f.truncate(offset)
        del net, blocks
        mx.save_safetensors(str(tmp / RESIDENT_FILE), resident, metadata={"format": "mlx-flash"})
        copy_tokenizer(src.tokenizer_dir, tmp)
        spec = {"d_model": layout.field("down_proj.weight").shape[0], "d_ff": layout.field("gate_proj.weight").shape[0]}
        store = ExpertStore(config["model_type"], config, spec["d_model"], spec["d_ff"], experts,
                            src.config[moe.top_k], quant, DTYPE_NAMES[mx_dtype], layout, layers, offset,
                            {"model": src.name, "requantized": requantized or None})
        store.save(tmp)  # written last: a folder without flash.json is not a model
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked by convert
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        n = sum(e is not None for e in layers)
        size = offset + (out / RESIDENT_FILE).stat().st_size
        print(f"wrote {out}: {n} MoE layers x {experts} experts of {layout.stride / 1e6:.3f} MB "
              f"({offset / 1e6:.1f} MB of experts, {size / 1e6:.1f} MB in all)")
        for l, errs in requantized.items():  # flash.json keeps them (source.requantized)
            print(f"layer {l}: {', '.join(errs)} quantized otherwise in the source, requantized to the extents' "
                  f"{quant['bits']} bits, group {quant['group_size']}: relative error {max(errs.values()):.4f}")
    return out

