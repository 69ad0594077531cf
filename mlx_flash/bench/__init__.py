"""The benchmark: the paper's Tables 2-3 and Figures 1, 2b, 4 and 7, measured on this machine.

    python -m mlx_flash.bench --model models/smollm2-135m --dram-budget min   (rows against naive mmap)
    python -m mlx_flash.bench --scale opt-6.7b                                (synthetic, at real size)
    python -m mlx_flash.bench --same-budget opt-6.7b --layers 16              (synthetic, end to end, one budget)
    python -m mlx_flash.probe disk|window --model models/smollm2-135m         (Figures 2b and 4)

`rows` runs the rows, `report` summarizes and prints them, `cgroup` runs them under a
memory limit, `scale` is the synthetic model at real size, `same_budget` every row end to end at
one budget on a synthetic quantized model, `probe` and `windowing`
are the disk probe and the windowing curve.
"""

from ..flash.budget import DEFAULT_THREADS  # noqa: F401
from .report import summarize, table, targets  # noqa: F401
from .rows import FLASH_ROWS, PHASE_LABELS, PHASES, QUICK, ROWS, key, load_setup, resolve_budgets, run_all  # noqa: F401


def main(argv=None):
    """`python -m mlx_flash.bench` as a function (tests, notebooks, the cgroup child)."""
    from .__main__ import main as bench_main

    return bench_main(argv)
