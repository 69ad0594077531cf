"""The prompt rows of the MoE benchmark (bench/moe.py): a prompt's time to its first logits in flash mode at
the same budget, in groups of tokens whose experts fit the slots or as one pass over each layer's experts.

    python -m mlx_flash.bench.moe --rows prompt-groups,prompt-pass --prompt-tokens 128

Each row loads the synthetic model in flash mode (bench/moe.py's run_row, in its cgroup) with cold slots and
runs one prompt of `--prompt-tokens` tokens as generate runs it: all but the last token in one chunk through
flash.prefill (numpy's matmuls on MLX's CPU backend: flash/expert_numpy.py), then the last token. Columns:
time to the first logits, experts and MB read (the last token's included), I/O and its exposed part, disk
bytes, how many MoE layers ran as a pass or in groups, slots, planned and peak bytes.
"""

import time
from typing import List

import mlx.core as mx
import numpy as np

from ..system import disk_read_bytes

PROMPT_ROWS = {"prompt-groups": "window", "prompt-pass": "pass"}  # row -> flash mode's --prompt-mode


def prompt_row(model, cache, stats, vocab: int, args, seed: int, chunk: int) -> dict:
    """A prompt row's one measurement: a prompt of --prompt-tokens from cold slots, to its first logits, run
    as generate runs it: all but the last token through flash.prefill in chunks of `chunk`, then the last."""
    from ..flash.prefill import prefill

    ids = np.random.default_rng(seed).integers(0, vocab, args.prompt_tokens).tolist()
    disk0, t0 = disk_read_bytes(), time.perf_counter()
    prefill(model, cache, ids[:-1], chunk)
    mx.eval(model(mx.array(ids[-1:])[None], cache=cache))
    ms = 1000 * (time.perf_counter() - t0)
    disk = disk_read_bytes() - disk0
    return {"ms_prompt": ms, "stats": stats.snapshot(), "disk_bytes": disk}


def summarize_prompt(runs: List[dict], budget: int, slack: int) -> dict:
    """A prompt row's medians over its repetitions."""
    ok = [r for r in runs if "ms_prompt" in r]
    if not ok:
        return {"fits": False, "reason": runs[0].get("reason", "failed")}
    med = lambda f: float(np.median([f(r) for r in ok]))
    # the prompt's last token runs as a decode step (generate's path): its reads are counted with the prompt's
    both = lambda prompt, decode: med(lambda r: r["stats"][prompt] + r["stats"][decode] * r["stats"]["decode_tokens"])
    s = {"ms_prompt": med(lambda r: r["ms_prompt"]), "ms_prompt_runs": [r["ms_prompt"] for r in ok],
         "experts_read": both("prompt_experts_read", "experts_read_per_token"),
         "mb_read": both("prompt_bytes_read", "bytes_read_per_token") / 1e6,
         "disk_mb": med(lambda r: r["disk_bytes"]) / 1e6, "ms_io": both("prompt_ms_io", "ms_io"),
         "ms_io_exposed": both("prompt_ms_io_exposed", "ms_io_exposed"),
         "passes": ok[0]["stats"]["prompt_passes"], "groups": ok[0]["stats"]["prompt_groups"],
         "slots": ok[0]["plan"]["slots"], "planned_bytes": ok[0]["plan"]["total"],
         "peak_mlx_bytes": max(r["peak_mlx_bytes"] for r in ok),
         "peak_cgroup_bytes": None if ok[0]["peak_cgroup_bytes"] is None else max(r["peak_cgroup_bytes"] for r in ok),
         "repeats": len(ok), "routing": ok[0]["routing"]}
    peak = s["peak_cgroup_bytes"] if s["peak_cgroup_bytes"] is not None else s["peak_mlx_bytes"]
    s["fits"] = len(ok) == len(runs) and s["planned_bytes"] <= budget and \
        peak <= budget + (slack if s["peak_cgroup_bytes"] is not None else 0)
    return s


def prompt_table(out: dict) -> List[str]:
    """The prompt rows' table lines of bench.moe's report (none without prompt rows)."""
    prompts = {row: s for row, s in out["summary"].items() if row in PROMPT_ROWS}
    if not prompts:
        return []
    gb = lambda v: "-" if v is None else f"{v / 1e9:.3f}"
    head = ["prompt row (synthetic)", f"ms for {out.get('prompt_tokens')} tokens", "experts read", "MB read",
            "I/O ms", "exposed I/O ms", "disk MB", "layers as pass / groups", "slots", "planned GB", "peak GB",
            "fits"]
    lines = ["", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row, s in prompts.items():
        if "ms_prompt" not in s:
            lines.append(f"| {row} | does not fit: {s['reason']} |")
            continue
        peak = s["peak_cgroup_bytes"] if s["peak_cgroup_bytes"] is not None else s["peak_mlx_bytes"]
        cells = [row, f"{s['ms_prompt']:.0f}", f"{s['experts_read']:.0f}", f"{s['mb_read']:.1f}", f"{s['ms_io']:.0f}",
                 f"{s['ms_io_exposed']:.0f}", f"{s['disk_mb']:.1f}", f"{s['passes']} / {s['groups']}",
                 str(s["slots"]), gb(s["planned_bytes"]), gb(peak), "yes" if s["fits"] else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
