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
from .errors import FlashError, cli
from .format import FlashConfig
from .expert_format import is_moe_folder
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
        if is_moe_folder(folder):  # a mixture of experts: its routers are exact, nothing to calibrate
            return folder
        predictors = FlashConfig.load(folder).predictors
        if predictors is None or "pinned" not in predictors:  # none yet, or from before outliers were pinned
            announce(f"calibrating sparsity and training the activation predictors of {folder} (once; "
                     f"under a minute on a CPU)")
            train(folder, tokens=tokens, dram_budget=dram_budget, **(train_options or {}))
    return folder


def memory_needs(folder: Path) -> dict:
    """What flash mode holds at the calibrated windows (no budget given) and the smallest budget its
    plan accepts, with the model's size, in bytes."""
    from .flash.attach import plan_flash, smallest_budget, trained_predictors
    from .load import load_resident

    if is_moe_folder(folder):  # every expert in a slot, or top-k slots per MoE layer
        from .expert_format import ExpertStore
        from .flash.attach import resident_facts
        from .flash.expert_attach import load_resident_moe, model_bytes, plan_experts

        store = ExpertStore.load(folder)
        model = load_resident_moe(folder, store)[0]
        full = plan_experts(store, model_bytes(folder, store), *resident_facts(model, []))
        return {"model": full.model, "default": full.total, "smallest": full.smallest, "experts": True}
    cfg = FlashConfig.load(folder)
    model, down_bias = load_resident(folder, cfg)
    predictors, _ = trained_predictors(folder, cfg)
    full = plan_flash(model, folder, cfg, down_bias, predictors)
    return {"model": full.model, "default": full.total,
            "smallest": smallest_budget(model, folder, cfg, down_bias, predictors)}


def model_for(model: str, mode: str = "flash") -> str:
    """What a command loads for --model: a built-in name in flash mode becomes its prepared copy."""
    return str(prepare(model)) if model in BUILTIN_MODELS and mode == "flash" else model


# What flash mode holds of the FFN when no calibration exists yet (estimate): per token predicted, and held
# by a window of 5 tokens. ReLU family: the paper's OPT-6.7B figures (about 10% predicted per token, 2.4% of
# the FFN new per token, so 10% + 4 x 2.4% over 5 tokens); other GLUs: the built-in SwiGLU model's, measured
# at the default recall (README, Quality: 92.9% predicted, 99.8% held).
ASSUMED_SHARES = {"relu-family": (0.10, 0.196), "other": (0.929, 0.998)}


def read_config(model: str) -> dict:
    """A model's config.json alone: a file, a folder's, or a Hub id's (only that file is downloaded)."""
    import json

    from .sources import hub_config

    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.exists() and model.count("/") == 1:
        path = hub_config(model)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FlashError(f"{path} not found: --estimate reads a config.json (a file, a model folder or a Hub id)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlashError(f"{path} is corrupt: {e}")


def estimate(config: dict, predicted: float = None, held: float = None, tokens: int = None, dtype: str = None,
             quantize: int = None, down_bits: int = None) -> dict:
    """What preparing and running a model needs, in bytes, from its config.json alone (before anything is
    downloaded): its size and resident part from the geometry, converting and calibrating as their budget
    checks count them, and flash mode's plan with windows holding `held` of each FFN (`predicted` of it per
    token), at its default context, and the smallest budget that plan accepts."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .convert import DTYPES, layer_bytes
    from .flash.budget import calibration_parts, plan
    from .flash.predictor import LowRankPredictor, default_ranks
    from .flash.sparsity import is_relu
    from .format import BundleLayout
    from .sources import instantiate
    from .train_predictors import DEFAULT_TOKENS, DEFAULT_SEQ_LEN, DEFAULT_WINDOW

    from .models.architectures import architecture

    if architecture(config).moe is not None:
        raise FlashError(f"--estimate does not size mixtures of experts ({config['model_type']}) yet: convert the "
                         f"model, and prepare states what flash mode needs")
    model = instantiate(config)  # lazy: its random initial weights are never computed
    spec = model.ffn_spec
    dtype = dtype or (config.get("torch_dtype") if config.get("torch_dtype") in DTYPES else "float16")
    item = DTYPES[dtype].size
    q = config.get("quantization")
    if quantize:  # convert --quantize: a float source's matrices, resident and FFN alike
        q = {"group_size": 64 if spec.d_model % 64 == 0 else 32, "bits": quantize}
    if q:  # as mlx-lm quantizes: every Linear and Embedding whose input splits into groups
        nn.quantize(model, q["group_size"], q["bits"],  # (the FFN of a float source stays float until bundled)
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % q["group_size"] == 0
                    and not (quantize and ".mlp." in p))
    size = lambda params: sum(v.size * (item if v.dtype == mx.float32 else v.dtype.size) for _, v in params)
    params = tree_flatten(model.parameters())
    resident = size((k, v) for k, v in params if ".mlp." not in k or k.endswith("down_proj.bias"))  # as convert
    bundles = {**q, "down_bits": down_bits or (quantize or max(8, q["bits"]))} if q else None
    layout = BundleLayout.build(spec.d_model, spec.glu, spec.bias, dtype, bundles)
    n_layers = len(model.layers)
    copied = (2 if spec.glu else 1) if q and not quantize else 0
    source_layer = size(tree_flatten(model.layers[0].mlp.parameters()))
    convert_layer = layer_bytes(model, spec, layout, DTYPES[dtype], copied) - sum(
        v.nbytes for _, v in tree_flatten(model.layers[0].mlp.parameters())) + source_layer

    relu = is_relu(spec.activation)
    default = ASSUMED_SHARES["relu-family" if relu else "other"]
    predicted, held = predicted or default[0], held or default[1]
    ranks = default_ranks(n_layers, spec.d_model)
    predictors = []
    for r in ranks:  # 8 bits in memory, as flash mode holds them (flash.attach.trained_predictors)
        p = LowRankPredictor(spec.d_model, spec.d_ff, r)
        nn.quantize(p, 32, 8, class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0)
        predictors.append(size(tree_flatten(p.parameters())))
    cfg = FlashConfig(
        architecture=config["model_type"], model_config=config, d_model=spec.d_model, d_ff=spec.d_ff,
        n_layers=n_layers, glu=spec.glu, bias=spec.bias, activation=spec.activation, dtype=dtype,
        quantization=bundles, layout=layout, layers=[], file_size=n_layers * spec.d_ff * layout.stride, source={},
        predictors={"window": DEFAULT_WINDOW, "target_recall": None, "pinned": [[] for _ in range(n_layers)],
                    "predicted_share": [predicted] * n_layers,
                    "window_union_p99": [held * spec.d_ff] * n_layers})
    total = resident + n_layers * spec.d_ff * layout.nbytes
    head = next((m for p, m in model.named_modules() if p.endswith("lm_head")), None) or \
        next(m for p, m in model.named_modules() if p.endswith("embed_tokens"))
    transient = 4 * (head.scales.size + head.biases.size) if "scales" in head else 0
    flash = lambda budget=None: plan(None, cfg, resident, sum(predictors), budget, transient=transient, item=item,
                                     total=total)
    lo, hi = 0, 4 * total
    while lo < hi:  # the smallest budget flash's plan accepts
        mid = (lo + hi) // 2
        try:
            flash(mid)
            hi = mid
        except FlashError:
            lo = mid + 1
    tokens = tokens or DEFAULT_TOKENS
    return {"model": total, "resident": resident, "ffn_on_disk": cfg.file_size,
            "convert": resident + convert_layer,
            "calibrate": sum(calibration_parts(cfg, resident, ranks, tokens, DEFAULT_SEQ_LEN).values()),
            "calibration_tokens": tokens, "flash": flash().total, "smallest": lo,
            "assumed": {"predicted": predicted, "held": held, "activation": spec.activation,
                        "source": "given" if (predicted, held) != default else
                        ("the paper's OPT-6.7B figures" if relu else "the built-in SwiGLU model's, measured")}}


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Convert a model into the flash layout and train its predictors, "
                                            "then print what flash mode needs and how to run it.")
    p.add_argument("--model", "-M", default=DEFAULT_MODEL,
                   help="built-in name, Hub id (mlx-community checkpoints too), HF folder or GGUF file")
    p.add_argument("--out", "-o", default=None, help="the flash folder (default: models/<name>)")
    p.add_argument("--dram-budget", default=None,
                   help="memory converting and calibrating may use (e.g. 8G): checked up front by each step")
    p.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: train_predictors')")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="float type of a float source's bundles and resident part (default: the source's)")
    p.add_argument("--quantize", "-q", type=int, choices=[4, 8], default=None,
                   help="quantize a float source to 4 or 8 bits (a quantized source keeps its own)")
    p.add_argument("--down-bits", type=int, default=None,
                   help="bits of the down projection's requantized columns (default: 8, or --quantize)")
    p.add_argument("--lookahead", action="store_true", help="also train lookahead predictors (prefetch)")
    p.add_argument("--estimate", action="store_true",
                   help="download nothing but config.json (a file, folder or Hub id): print what preparing and "
                        "running the model need, from its geometry and assumed FFN shares")
    p.add_argument("--predicted-share", type=float, default=None,
                   help="with --estimate: the FFN's share predicted per token (default: 0.10 for the ReLU family, "
                        "the paper's; 0.93 for other GLUs, measured on the built-in model)")
    p.add_argument("--held-share", type=float, default=None,
                   help="with --estimate: the FFN's share a window of 5 tokens holds (default 0.196 or 0.998)")
    return p


@cli
def main(argv=None):
    args = setup_arg_parser().parse_args(argv)
    if args.estimate:
        return print_estimate(args.model, estimate(read_config(args.model), args.predicted_share, args.held_share,
                                                   args.tokens, args.dtype, args.quantize, args.down_bits))
    folder = prepare(args.model, args.out, dram_budget=args.dram_budget, tokens=args.tokens,
                     convert_options={k: v for k, v in {"dtype": args.dtype, "quantize": args.quantize,
                                                         "down_bits": args.down_bits}.items() if v is not None},
                     train_options={"lookahead": True} if args.lookahead else None)
    need = memory_needs(folder)
    mb = lambda b: f"{b / 1e6:,.0f} MB"
    held, fewer = ("with a slot for every expert", "with top-k expert slots per MoE layer") if need.get("experts") \
        else ("at its calibrated windows", "with smaller windows")
    print(f"{folder}: the model is {mb(need['model'])}; flash mode holds {mb(need['default'])} {held} "
          f"({need['default'] / need['model']:.0%}) and runs in as little as {mb(need['smallest'])} "
          f"({need['smallest'] / need['model']:.0%}) {fewer}, plus the Python interpreter (~100 MB)")
    print("run it:")
    print(f"  python -m mlx_flash.generate --model {folder} --mode flash -p \"Hello\"")
    print(f"  python -m mlx_flash.server --model {folder} --mode flash")
    print(f"  python -m mlx_flash.evaluate --model {folder}")


def print_estimate(model: str, e: dict):
    mb = lambda b: f"{b / 1e6:,.0f} MB"
    a = e["assumed"]
    print(f"{model}: {mb(e['model'])} in the flash layout ({mb(e['resident'])} resident: embeddings, attention, "
          f"norms, LM head; {mb(e['ffn_on_disk'])} of FFN bundles on disk)")
    print(f"  convert: {mb(e['convert'])} (the resident part and one FFN layer)")
    print(f"  calibrate: {mb(e['calibrate'])} ({e['calibration_tokens']} tokens)")
    print(f"  flash mode: {mb(e['flash'])} with windows holding {a['held']:.0%} of each FFN "
          f"({a['predicted']:.0%} predicted per token: {a['source']}; {a['activation']}), as little as "
          f"{mb(e['smallest'])} with smaller windows; plus the Python interpreter (~100 MB)")
    print("  estimated from config.json; `prepare` measures them after calibration")


if __name__ == "__main__":
    main()
