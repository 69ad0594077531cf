"""Shared fixtures: tiny random models in HF layout, and the real built-in model converted once."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, flash_fixtures

from tiny_models import make_llama, make_opt  # noqa: E402

TINY = {
    "llama_silu_tied": lambda d: make_llama(d, hidden_act="silu", tie_word_embeddings=True, seed=0),
    "llama_relu_untied": lambda d: make_llama(d, hidden_act="relu", tie_word_embeddings=False, seed=0),
    "opt_pre_ln": lambda d: make_opt(d, do_layer_norm_before=True, seed=0),
    "opt_post_ln": lambda d: make_opt(d, do_layer_norm_before=False, seed=0),
    "opt_proj": lambda d: make_opt(d, do_layer_norm_before=True, word_embed_proj_dim=32, seed=0),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> folder of a tiny random model in Hugging Face layout (made once)."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(name):
        if name not in made:
            made[name] = Path(TINY[name](root / name) or root / name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_flash(tiny_model, tmp_path_factory):
    """tiny_flash(name, **convert_options) -> converted flash folder (made once per options)."""
    from mlx_flash.convert import convert

    root = tmp_path_factory.mktemp("tiny_flash")
    made = {}

    def get(name, **opts):
        key = (name, tuple(sorted(opts.items())))
        if key not in made:
            out = root / f"{name}-{len(made)}"
            made[key] = convert(str(tiny_model(name)), out, quiet=True, **opts)
        return made[key]

    return get


@pytest.fixture(scope="session")
def smol_flash(tmp_path_factory):
    """The built-in SmolLM2-135M converted with default options (~3 s, once per session)."""
    from mlx_flash.convert import convert

    return convert("smollm2-135m", tmp_path_factory.mktemp("smol") / "smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smol_calibrated(smol_flash, tmp_path_factory):
    """The built-in model converted and calibrated with the defaults prepare() uses (once per session:
    the quality tests and the README's commands share it)."""
    import shutil

    from mlx_flash.prepare import CALIBRATION_TOKENS
    from mlx_flash.train_predictors import train

    out = tmp_path_factory.mktemp("smolq") / "smollm2-135m"
    shutil.copytree(smol_flash, out)
    train(out, tokens=CALIBRATION_TOKENS, progress=False)
    return out


@pytest.fixture(scope="session")
def trained_flash(tiny_model, tmp_path_factory):
    """trained_flash(name, convert={...}, **train_options) -> converted tiny model with calibrated
    predictors (made once per options)."""
    from mlx_flash.convert import convert
    from mlx_flash.train_predictors import train

    root = tmp_path_factory.mktemp("trained")
    made = {}

    def get(name, convert_options=None, **opts):
        key = (name, tuple(sorted((convert_options or {}).items())), tuple(sorted(opts.items())))
        if key not in made:
            out = convert(str(tiny_model(name)), root / f"{name}-{len(made)}", quiet=True, **(convert_options or {}))
            train(out, tokens=2048, seq_len=128, epochs=4, progress=False, **opts)
            made[key] = out
        return made[key]

    return get
