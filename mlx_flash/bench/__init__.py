"""The benchmark: the paper's Tables 2-3 and Figures 1, 2b, 4 and 7, measured on this machine.

    python -m mlx_flash.bench --model models/smollm2-135m --dram-budget min   (rows against naive mmap)
    python -m mlx_flash.bench --scale opt-6.7b                                (synthetic, at real size)
    python -m mlx_flash.probe disk|window --model models/smollm2-135m         (Figures 2b and 4)
"""

from .rows import *  # noqa: F401,F403  (interim: split into rows, report, cgroup next)
from .rows import main  # noqa: F401
