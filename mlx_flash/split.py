"""Files per rank: split a flash folder into one folder per machine of a pipeline.

    python -m mlx_flash.split --model models/opt-6.7b --shards 2
        -> models/opt-6.7b-rank0-of-2  (layers 0-15, the embeddings)
           models/opt-6.7b-rank1-of-2  (layers 16-31, the final norm and the LM head)

Rank r of N runs a contiguous run of layers (mlx_flash.pipeline). Its folder is a flash model of
those layers only: their bundles (byte for byte, so each layer's SHA-256 is the source's), their
resident weights and predictors, renumbered from 0 in `ffn.bundles` and the predictors file.
`model_config` stays the whole model's (layer-dependent settings such as sliding-window
patterns keep their indices); flash.json's `pipeline` entry says which rank, of how many, which
layers, and which split of which model (`split_id`), so a rank started on another rank's folder,
or on a folder of another split, refuses in one line.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import List, Tuple

import mlx.core as mx
import numpy as np

from .errors import FlashError, cli
from .format import BUNDLES_FILE, CONFIG_FILE, PAGE, RESIDENT_FILE, FlashConfig, round_up
from .models.in_out import LAYOUT_KEY
from .sources import copy_tokenizer

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_INPUT_SIDE = ("embed", "wte", "wpe", "project_in")  # what turns token ids into the first layer's input
_NOT_PER_LAYER = ("calibration",)  # flash.json predictor entries whose lists are not one item per layer


def rank_folder(model, rank: int, ranks: int) -> Path:
    return Path(f"{str(model).rstrip('/')}-rank{rank}-of-{ranks}")


def layer_ranges(n_layers: int, ranks: int) -> List[Tuple[int, int]]:
    """Contiguous [start, end) runs of layers, the first ranks one longer when they do not divide."""
    if not 1 <= ranks <= n_layers:
        raise FlashError(f"--shards must be between 1 and the model's {n_layers} layers")
    base, extra = divmod(n_layers, ranks)
    starts = [r * base + min(r, extra) for r in range(ranks + 1)]
    return list(zip(starts[:-1], starts[1:]))


def owns(key: str, rank: int, ranks: int, layers: Tuple[int, int], tied: bool) -> bool:
    """Whether a resident weight belongs to this rank: its layers' weights; the embeddings on the first
    rank; the final norm and LM head (and a tied head's embedding matrix) on the last."""
    m = _LAYER.search(key)
    if m:
        return layers[0] <= int(m.group(1)) < layers[1]
    first = any(s in key for s in _INPUT_SIDE)
    if rank == 0 and first:
        return True
    return rank == ranks - 1 and (not first or (tied and "embed_tokens" in key))


def held(rank: int, ranks: int, tied: bool) -> str:
    """What a rank holds besides its layers, in words."""
    parts = (["embeddings"] if rank == 0 else []) + \
            (["final norm", "LM head" + (" (the tied embeddings)" if tied and rank else "")] if rank == ranks - 1 else [])
    return " + " + ", ".join(parts) if parts else ""


def is_tied(keys) -> bool:
    return not any("lm_head" in k for k in keys)


def split_id(cfg: FlashConfig, ranks: int) -> str:
    """The same for every rank of one split of one model (the source's per-layer checksums and the split)."""
    facts = json.dumps([[l["sha256"] for l in cfg.layers], cfg.n_layers, ranks, cfg.predictors is not None])
    return hashlib.sha256(facts.encode()).hexdigest()[:16]


def _per_layer(entry, start: int, end: int, n: int):
    """A predictors entry of flash.json with every per-layer list cut to layers [start, end)."""
    if isinstance(entry, list) and len(entry) == n:
        return entry[start:end]
    if isinstance(entry, dict):
        return {k: v if k in _NOT_PER_LAYER else _per_layer(v, start, end, n) for k, v in entry.items()}
    return entry


def rank_config(cfg: FlashConfig, rank: int, ranks: int, keys) -> FlashConfig:
    """Rank `rank`'s flash.json: its layers renumbered from 0 at their offsets in its own ffn.bundles."""
    start, end = layer_ranges(cfg.n_layers, ranks)[rank]
    layers, offset = [], 0
    for l in range(start, end):
        layers.append({**cfg.layers[l], "offset": offset})
        offset = round_up(offset + cfg.layers[l]["nbytes"], PAGE)
    mc = json.loads(json.dumps(cfg.model_config))
    q = mc.get("quantization")
    if q and LAYOUT_KEY in q:  # the modules stored (in, out): those this rank holds
        q[LAYOUT_KEY] = [p for p in q[LAYOUT_KEY] if f"{p}.weight" in keys]
    predictors = _per_layer(cfg.predictors, start, end, cfg.n_layers) if cfg.predictors else None
    out = replace(cfg, model_config=mc, n_layers=end - start, layers=layers, file_size=offset,
                  predictors=predictors)
    out.pipeline = {"rank": rank, "ranks": ranks, "layers": [start, end], "n_layers": cfg.n_layers,
                    "split_id": split_id(cfg, ranks)}
    return out


def split(model, ranks: int, out_prefix=None, quiet: bool = False) -> List[Path]:
    """Write one folder per rank next to the model (or at `out_prefix`-rank<r>-of-<N>)."""
    src = Path(model)
    if not (src / CONFIG_FILE).is_file():
        raise FlashError(f"{src} is not a flash model folder (no {CONFIG_FILE}): convert it first")
    cfg = FlashConfig.load(src)
    cfg.check_files(src)
    if cfg.pipeline:
        raise FlashError(f"{src} is already rank {cfg.pipeline['rank']} of a {cfg.pipeline['ranks']}-rank split")
    ranges = layer_ranges(cfg.n_layers, ranks)
    weights = mx.load(str(src / RESIDENT_FILE))  # lazy: each tensor is read when saved
    pfile = (cfg.predictors or {}).get("file")  # none: predictors given at load (the synthetic benchmark's)
    predictors = mx.load(str(src / pfile)) if pfile else {}
    tied = is_tied(weights)
    data = np.memmap(src / BUNDLES_FILE, dtype=np.uint8, mode="r")
    outs = []
    for rank, (start, end) in enumerate(ranges):
        out = rank_folder(out_prefix or src, rank, ranks)
        if out.exists() and any(out.iterdir()):
            raise FlashError(f"{out} already exists: remove it or choose another --out")
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mine = {k: v for k, v in weights.items() if owns(k, rank, ranks, (start, end), tied)}
        rcfg = rank_config(cfg, rank, ranks, mine)
        with open(tmp / BUNDLES_FILE, "wb") as f:
            for l, info in zip(range(start, end), rcfg.layers):
                f.seek(info["offset"])
                f.write(data[cfg.layers[l]["offset"] : cfg.layers[l]["offset"] + info["nbytes"]])
            f.truncate(rcfg.file_size)
        mx.save_safetensors(str(tmp / RESIDENT_FILE), mine, metadata={"format": "mlx-flash"})
        if pfile:
            renamed = {}
            for k, v in predictors.items():  # "<l>.up.weight" or "lookahead.<l>.up.weight"
                head, l, rest = re.match(r"(\D*)(\d+)\.(.*)", k).groups()
                l = int(l)
                if start <= l < end and not (head and l == start):
                    renamed[f"{head}{l - start}.{rest}"] = v
            mx.save_safetensors(str(tmp / pfile), renamed)
        copy_tokenizer(src, tmp)
        rcfg.save(tmp)  # written last: a folder without flash.json is not a model
        os.replace(tmp, out)  # an empty folder of that name is replaced
        outs.append(out)
        if not quiet:
            print(f"rank {rank}: layers {start}-{end - 1}{held(rank, ranks, tied)} -> {out} ({rcfg.file_size / 1e6:.1f} "
                  f"MB of bundles, {(out / RESIDENT_FILE).stat().st_size / 1e6:.1f} MB resident)")
    return outs


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Split a flash model folder into one folder per pipeline rank.")
    p.add_argument("--model", "-M", required=True, help="a converted (and calibrated) flash model folder")
    p.add_argument("--shards", type=int, required=True, help="ranks (machines) of the pipeline")
    p.add_argument("--out", "-o", default=None,
                   help="prefix of the rank folders (default: the model folder): <out>-rank<r>-of-<N>")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    split(args.model, args.shards, args.out)


if __name__ == "__main__":
    main()
