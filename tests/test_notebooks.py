"""The notebooks run top to bottom on a tiny trained model, in a kernel of this Python.

They are stored without outputs; each reads its parameters from MLX_FLASH_NB_*
environment variables, which the kernel inherits from this process.
"""

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 120  # s
KERNEL = "mlx-flash-tests"


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    """A kernelspec that runs this very interpreter (not whatever `python3` kernel the user has)."""
    root = tmp_path_factory.mktemp("kernels")
    (root / KERNEL).mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "mlx-flash tests", "language": "python"}
    (root / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return [str(root)]


def execute(name, kernel_dirs):
    """Run a notebook; returns it with its outputs (raises CellExecutionError on the first error)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable, end='')"))
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(NOTEBOOKS.parent)}})
    client.execute()
    assert nb.cells[-1].outputs[0]["text"] == sys.executable, "the kernel runs another Python"
    return nb


def outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind
            or kind in o.get("data", {})]


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name} is stored with outputs"


def test_quickstart(trained_flash, kernel_dirs, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_NB_MODEL", str(trained_flash("opt_pre_ln")))
    monkeypatch.setenv("MLX_FLASH_NB_TOKENS", "6")
    nb = execute("quickstart.ipynb", kernel_dirs)
    assert not outputs(nb, "error")
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert "ms/token" in text and "I/O" in text and "MB/token" in text
    assert outputs(nb, "image/png"), "no figure drawn"


def test_paper_figures(trained_flash, kernel_dirs, monkeypatch):
    pytest.importorskip("mlx_flash.bench")
    for k, v in {"MODEL": str(trained_flash("opt_pre_ln")), "BUDGET": "2M", "TOKENS": "2", "CHUNKS": "4K:16K",
                 "PROBE_BYTES": "64K", "WINDOW_TOKENS": "128"}.items():
        monkeypatch.setenv(f"MLX_FLASH_NB_{k}", v)
    nb = execute("paper_figures.ipynb", kernel_dirs)
    assert not outputs(nb, "error")
    tables = [o["data"]["text/markdown"] for o in outputs(nb, "text/markdown")]
    assert any("all (+ coalescing)" in t for t in tables), "no benchmark table"
    assert len(outputs(nb, "image/png")) == 3, "expected figures 1, 2b and 4"
