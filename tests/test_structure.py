"""The package's shape: data flows one way (source -> convert -> flash folder -> load -> model -> commands).

Every module of mlx_flash belongs to a layer; a module may import modules of its own layer or
below, never above, and the import graph (function-level imports included) has no cycle.
"""

import ast
import subprocess
import sys
from pathlib import Path

import mlx_flash

PACKAGE = Path(mlx_flash.__file__).parent

# lowest first; a module not listed here fails the test, so a new one gets a place on purpose
LAYERS = [
    {"mlx_flash", "mlx_flash.errors", "mlx_flash.sizes", "mlx_flash.watchdog"},
    {"mlx_flash.format", "mlx_flash.system", "mlx_flash.expert_format"},
    {"mlx_flash.models", "mlx_flash.models.ffn", "mlx_flash.models.architectures", "mlx_flash.models.opt",
     "mlx_flash.models.in_out"},
    {"mlx_flash.sources", "mlx_flash.gguf"},
    {"mlx_flash.flash", "mlx_flash.flash.sparsity", "mlx_flash.flash.predictor", "mlx_flash.flash.neuron_cache",
     "mlx_flash.flash.bundle_reader", "mlx_flash.flash.budget", "mlx_flash.flash.ffn", "mlx_flash.flash.attach",
     "mlx_flash.flash.prefetch", "mlx_flash.flash.outliers", "mlx_flash.flash.expert_cache",
     "mlx_flash.flash.experts", "mlx_flash.flash.expert_attach", "mlx_flash.flash.prompt", "mlx_flash.flash.prefill",
     "mlx_flash.flash.expert_prompt", "mlx_flash.flash.expert_numpy"},
    {"mlx_flash.load", "mlx_flash.conversation"},
    {"mlx_flash.baselines"},
    {"mlx_flash.convert", "mlx_flash.convert_experts", "mlx_flash.train_predictors", "mlx_flash.calibrate",
     "mlx_flash.evaluate", "mlx_flash.generate", "mlx_flash.server", "mlx_flash.prepare", "mlx_flash.split",
     "mlx_flash.pipeline", "mlx_flash.launch"},
    {"mlx_flash.bench", "mlx_flash.bench.__main__", "mlx_flash.bench.rows", "mlx_flash.bench.report",
     "mlx_flash.bench.cgroup", "mlx_flash.bench.scale", "mlx_flash.bench.synthetic",
     "mlx_flash.bench.same_budget", "mlx_flash.bench.probe", "mlx_flash.bench.windowing", "mlx_flash.bench.matmul",
     "mlx_flash.bench.cli", "mlx_flash.bench.moe", "mlx_flash.bench.moe_prompt", "mlx_flash.bench.moe_synthetic", "mlx_flash.bench.calibration", "mlx_flash.bench.prompts", "mlx_flash.bench.chat", "mlx_flash.probe", "mlx_flash.bench.peer",
     "mlx_flash.bench.peer_build", "mlx_flash.bench.peer_model", "mlx_flash.bench.pipeline"},
    {"mlx_flash.demo"},  # the whole pipeline, the benchmark's same-budget rows included
]
LAYER = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_name(path: Path) -> str:
    parts = ("mlx_flash",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set) -> set:
    """Package modules `name` imports anywhere in its file (function bodies too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mlx_flash")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("mlx_flash"):
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            out |= subs
            if len(subs) < len(node.names):  # names from the module itself, not only its submodules
                out.add(target)
    # importing a.b.c runs a and a.b first: only the named module counts as the edge
    return {m for m in out if m in known and m != name}


def graph() -> dict:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    assert sorted(set(modules()) - set(LAYER)) == [], "give new modules a place in LAYERS"


def test_no_module_imports_one_above_it():
    up = [(m, d) for m, deps in graph().items() for d in deps if LAYER[d] > LAYER[m]]
    assert up == [], f"imports against the flow: {up}"


def test_import_graph_has_no_cycle():
    g = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_every_module_imports_on_its_own():
    """Each module imported first in a fresh set of mlx_flash modules (an order-dependent import fails here)."""
    names = [m for m in modules() if not m.endswith("__main__")]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    for k in [k for k in sys.modules if k == 'mlx_flash' or k.startswith('mlx_flash.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(name)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
