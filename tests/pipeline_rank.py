"""One rank of a pipeline test (tests/test_pipeline.py starts every rank with mlx_flash.launch).

    python -m mlx_flash.launch --ranks 2 -- tests/pipeline_rank.py MODEL OUT PROMPT_IDS N MODE[,MODE] [KEY=VALUE ...]

For each mode, loads this rank's folder of MODEL, greedily generates N tokens after the prompt and
writes OUT/rank<r>-<mode>.npz: the tokens, the last rank's logits, and the bytes its reader read
with the folder it read them from.
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from mlx_flash import pipeline

model, out, prompt, n, modes = sys.argv[1:6]
options = {k: int(v) for k, v in (a.split("=") for a in sys.argv[6:])}
prompt = [int(t) for t in prompt.split(",")]
link = pipeline.start(60)
folder = pipeline.rank_model_folder(model, link.rank, link.size)
for mode in modes.split(","):
    net, cfg, _ = pipeline.load_rank(folder, link.rank, link.size, mode, **(options if mode == "flash" else {}))
    pipeline.connect(net, cfg, link)
    tokens, logits = [], []
    for token, lg in pipeline.generate_tokens(net, prompt, int(n), make_sampler(temp=0.0), pipeline.prefill_chunk(net),
                                              link, tuple(cfg.pipeline["layers"])):
        tokens.append(token)
        if lg is not None:
            logits.append(np.array(lg.astype(mx.float32))[0])
    reader = getattr(net, "flash_reader", None)
    np.savez(Path(out) / f"rank{link.rank}-{mode}.npz", tokens=tokens, logits=np.array(logits),
             bytes_read=reader.stats.bytes_read if reader else 0, folder=str(reader.path.parent) if reader else "")
