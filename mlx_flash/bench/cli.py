"""What the benchmark commands share: their common flags, --json files and --plots figures."""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from ..flash.budget import DEFAULT_THREADS


@contextmanager
def figure(path: Path, title: str, ylabel: str, xlabel: Optional[str] = None, size=(6.4, 4.2), grid: bool = True,
           legend: int = 8):
    """One matplotlib figure drawn on the yielded axes, labelled and saved as a PNG (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if grid:
            ax.grid(alpha=0.3)
        ax.legend(fontsize=legend)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def write_outputs(result: dict, json_path: Optional[str], plots_dir: Optional[str], plot):
    """--json and --plots of every benchmark command; plot(folder) draws the figures."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    if plots_dir:
        Path(plots_dir).mkdir(parents=True, exist_ok=True)
        plot(Path(plots_dir))


def add_common_arguments(p, rows, probe_bytes: int):
    """Flags the model benchmark and scale mode share."""
    p.add_argument("--rows", default=",".join(rows), help=f"comma list of {', '.join(rows)}")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="read threads (flash and hybrid)")
    p.add_argument("--coalesce-gap", default="auto", help="gap of the 'all' row, or 'auto' (measured)")
    p.add_argument("--json", default=None, help="write every figure (and every run) to this file")
    p.add_argument("--plots", default=None, help="write PNG figures into this folder")
    p.add_argument("--quick", action="store_true", help="tiny settings, for tests and a first look")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-probe", action="store_true", help="skip the disk probe at the rows' read sizes")
    p.add_argument("--probe-bytes", default=str(probe_bytes), help=f"bytes per probe point (default {probe_bytes >> 20}M)")
