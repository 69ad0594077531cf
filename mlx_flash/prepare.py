"""Built-in models in flash mode: converted and calibrated once, then reused.

    python -m mlx_flash.generate --model smollm2-135m --mode flash   # prepares it on first use

Flash mode needs the flash layout and trained predictors. For a built-in name, the commands
(generate, server, evaluate, bench, probe, demo) and the notebooks call `prepare`, which
converts the model into `sources.default_folder(name)` (models/<name>) and trains its
predictors, each step only if not done yet, with progress bars. Other sources are converted
with python -m mlx_flash.convert: their size and options are the user's to choose.
"""

import sys
from contextlib import redirect_stdout
from pathlib import Path

from .convert import convert
from .format import FlashConfig
from .load import is_flash_folder
from .sources import BUILTIN_MODELS, DEFAULT_MODEL, default_folder
from .system import exclusive_lock
from .train_predictors import train

CALIBRATION_TOKENS = 1024  # half train_predictors' default, so that a first run on a CPU stays short


def say(msg: str):
    print(f"== {msg}", file=sys.stderr, flush=True)


def prepare(model: str = DEFAULT_MODEL, folder=None, announce=say) -> Path:
    """Convert `model` into `folder` (default: models/<name>) and train its predictors, each
    only if not done yet; returns the folder. Everything it prints goes to stderr (generate's stdout
    is the generated text), and a second process preparing the same folder waits for the first."""
    folder = Path(folder or default_folder(model))
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder.parent), redirect_stdout(sys.stderr):
        if not is_flash_folder(folder):
            announce(f"converting {model} into the flash layout at {folder} (once)")
            convert(model, folder)
        predictors = FlashConfig.load(folder).predictors
        if predictors is None or "pinned" not in predictors:  # none yet, or from before outliers were pinned
            announce(f"calibrating sparsity and training the activation predictors of {folder} (once; "
                     f"minutes on a CPU)")
            train(folder, tokens=CALIBRATION_TOKENS)
    return folder


def model_for(model: str, mode: str = "flash") -> str:
    """What a command loads for --model: a built-in name in flash mode becomes its prepared copy."""
    return str(prepare(model)) if model in BUILTIN_MODELS and mode == "flash" else model
