"""A model from its source to flash mode in one command: convert, calibrate, then say how to run it.

    python -m mlx_flash.prepare --model mlx-community/Qwen3-8B-4bit --dram-budget 8G
    python -m mlx_flash.generate --model smollm2-135m --mode flash   # a built-in name: prepared on first use

Flash mode needs the flash layout and trained predictors. `prepare` converts the model into
`sources.default_folder(name)` (models/<name>) and trains its predictors, each step only if not
done yet, with progress bars, within --dram-budget; then it prints what flash mode needs in memory
(at its calibrated windows, and the smallest budget its plan accepts) and the commands that run it.
For a built-in name, the commands (generate, server, evaluate, bench, probe, demo) and the notebooks
call it themselves.
"""

import argparse
import sys
from contextlib import redirect_stdout
from pathlib import Path

from .convert import convert
from .errors import cli
from .format import FlashConfig
from .load import is_flash_folder
from .sources import BUILTIN_MODELS, DEFAULT_MODEL, default_folder
from .system import exclusive_lock
from .train_predictors import train

CALIBRATION_TOKENS = 1024  # half train_predictors' default, so that a first run on a CPU stays short


def say(msg: str):
    print(f"== {msg}", file=sys.stderr, flush=True)


def prepare(model: str = DEFAULT_MODEL, folder=None, announce=say, dram_budget=None, tokens=None,
            convert_options=None, train_options=None) -> Path:
    """Convert `model` into `folder` (default: models/<name>) and train its predictors, each
    only if not done yet; returns the folder. Everything it prints goes to stderr (generate's stdout
    is the generated text), and a second process preparing the same folder waits for the first.
    dram_budget: what converting and calibrating may hold (checked up front by each);
    tokens: calibration tokens (default: CALIBRATION_TOKENS for a built-in name, else train's)."""
    folder = Path(folder or default_folder(model))
    folder.parent.mkdir(parents=True, exist_ok=True)
    if tokens is None and model in BUILTIN_MODELS:
        tokens = CALIBRATION_TOKENS
    with exclusive_lock(folder.parent), redirect_stdout(sys.stderr):
        if not is_flash_folder(folder):
            announce(f"converting {model} into the flash layout at {folder} (once)")
            convert(model, folder, dram_budget=dram_budget, **(convert_options or {}))
        predictors = FlashConfig.load(folder).predictors
        if predictors is None or "pinned" not in predictors:  # none yet, or from before outliers were pinned
            announce(f"calibrating sparsity and training the activation predictors of {folder} (once; "
                     f"minutes on a CPU)")
            train(folder, tokens=tokens, dram_budget=dram_budget, **(train_options or {}))
    return folder


def memory_needs(folder: Path) -> dict:
    """What flash mode holds at the calibrated windows (no budget given) and the smallest budget its
    plan accepts, with the model's size, in bytes."""
    from .flash.attach import plan_flash, smallest_budget, trained_predictors
    from .load import load_resident

    cfg = FlashConfig.load(folder)
    model, down_bias = load_resident(folder, cfg)
    predictors, _ = trained_predictors(folder, cfg)
    full = plan_flash(model, folder, cfg, down_bias, predictors)
    return {"model": full.model, "default": full.total,
            "smallest": smallest_budget(model, folder, cfg, down_bias, predictors)}


def model_for(model: str, mode: str = "flash") -> str:
    """What a command loads for --model: a built-in name in flash mode becomes its prepared copy."""
    return str(prepare(model)) if model in BUILTIN_MODELS and mode == "flash" else model


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Convert a model into the flash layout and train its predictors, "
                                            "then print what flash mode needs and how to run it.")
    p.add_argument("--model", "-M", default=DEFAULT_MODEL,
                   help="built-in name, Hub id (mlx-community checkpoints too), HF folder or GGUF file")
    p.add_argument("--out", "-o", default=None, help="the flash folder (default: models/<name>)")
    p.add_argument("--dram-budget", default=None,
                   help="memory converting and calibrating may use (e.g. 8G): checked up front by each step")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: train_predictors')")
    p.add_argument("--quantize", "-q", type=int, choices=[4, 8], default=None,
                   help="quantize a float source to 4 or 8 bits (a quantized source keeps its own)")
    p.add_argument("--lookahead", action="store_true", help="also train lookahead predictors (prefetch)")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    folder = prepare(args.model, args.out, dram_budget=args.dram_budget, tokens=args.tokens,
                     convert_options={"quantize": args.quantize} if args.quantize else None,
                     train_options={"lookahead": True} if args.lookahead else None)
    need = memory_needs(folder)
    mb = lambda b: f"{b / 1e6:,.0f} MB"
    print(f"{folder}: the model is {mb(need['model'])}; flash mode holds {mb(need['default'])} at its calibrated "
          f"windows ({need['default'] / need['model']:.0%}) and runs in as little as {mb(need['smallest'])} "
          f"({need['smallest'] / need['model']:.0%}) with smaller windows, plus the Python interpreter (~100 MB)")
    print("run it:")
    print(f"  python -m mlx_flash.generate --model {folder} --mode flash -p \"Hello\"")
    print(f"  python -m mlx_flash.server --model {folder} --mode flash")
    print(f"  python -m mlx_flash.evaluate --model {folder}")


if __name__ == "__main__":
    main()
