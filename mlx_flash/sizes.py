"""Sizes on the command line, parsed one way everywhere.

Units follow GNU coreutils (dd, df): K, M, G, T and KiB, MiB, GiB, TiB are powers
of 1024; KB, MB, GB, TB are powers of 1000; no unit is bytes. So `--dram-budget 8G`
is 8 GiB and `--chunks 4K` is one 4096-byte page. A DRAM budget may also be a
share of the model: a plain number up to 1 (`0.5`) or a percentage (`140%`).
"""

import re
from typing import Optional

from .errors import FlashError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?(?:i?b)?)\s*$", re.I)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text, what: str = "size") -> int:
    """'4K' -> 4096, '1.5M' -> 1572864, '60MB' -> 60000000, '512' -> 512."""
    m = _SIZE.match(str(text))
    if not m:
        raise FlashError(f"{what} '{text}' is not a size (e.g. 512, 4K, 1.5G, 60MB)")
    unit = m.group(2).lower()
    base = 1000 if unit.endswith("b") and not unit.endswith("ib") else 1024
    return int(float(m.group(1)) * base ** _POWER.get(unit[:1], 0))


def parse_budget(budget, total: int) -> Optional[int]:
    """A DRAM budget in bytes: a size (parse_size), or a share of the model's `total` bytes (0.5, '120%')."""
    if budget is None:
        return None
    text = str(budget).strip()
    if text.endswith("%"):
        try:
            return int(float(text[:-1]) / 100 * total)
        except ValueError:
            pass
    else:
        try:
            value = float(text)
            if value <= 1.0:
                return int(value * total)
        except ValueError:
            pass
    try:
        return parse_size(text)
    except FlashError:
        raise FlashError(f"--dram-budget '{budget}' is not a size (e.g. 60M, 1.5G) or a share (e.g. 0.6, 120%)")

