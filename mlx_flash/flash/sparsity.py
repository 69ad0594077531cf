"""Which FFN neurons are active, measured on text (paper Section 3.1, DESIGN "Sparsity").

- ReLU models (OPT, ReluLLaMA, ProSparse): neuron j is active iff its activation > 0.
- Other GLU models (SmolLM2, Llama 3): active iff |act(gate_j x) * up_j x| > t_l, with
  one threshold per layer calibrated on text for a target sparsity.

`collect` runs a dense model over text and keeps, per layer, the FFN inputs and
hidden activations: the training data of the predictors.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from ..errors import FlashError

DATA = Path(__file__).resolve().parent.parent / "data"  # mlx_flash/data
CALIBRATION_TEXT = DATA / "calibration.txt"
HELDOUT_TEXT = DATA / "heldout.txt"


def is_relu(activation: str) -> bool:
    return activation == "relu"


def read_texts(paths: Optional[List[str]]) -> str:
    """The calibration text: the files given, or the text shipped in the package."""
    paths = paths or [str(CALIBRATION_TEXT)]
    out = []
    for p in paths:
        try:
            out.append(Path(p).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise FlashError(f"cannot read text file {p}: {e.strerror}")
    text = "\n\n".join(out)
    if not text.strip():
        raise FlashError("the calibration text is empty")
    return text


def encode_long(tokenizer, text: str, piece: int = 4000) -> list:
    """Token ids of a long text, encoded paragraph-aligned piece by piece (tokenizers warn past their
    context length, and a BPE never merges across a paragraph break anyway)."""
    ids, start = [], 0
    while start < len(text):
        end = text.find("\n", start + piece)
        end = len(text) if end < 0 else end + 1
        ids += tokenizer.encode(text[start:end], add_special_tokens=start == 0)
        start = end
    return ids


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int) -> np.ndarray:
    """(n_seq, seq_len) token ids: consecutive windows of the text."""
    ids = np.array(encode_long(tokenizer, text), dtype=np.int32)
    n_seq = min(n_tokens // seq_len, len(ids) // seq_len)
    if n_seq < 1:
        raise FlashError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: n_seq * seq_len].reshape(n_seq, seq_len)


class _LastLayerDone(Exception):
    """Raised after the last FFN: the final norm and the LM head are not needed."""


class _Recorder(nn.Module):
    """Wraps an FFN provider: computes as usual and keeps its inputs and activations."""

    def __init__(self, ffn, last: bool):
        super().__init__()
        self.ffn, self.last = ffn, last
        self.xs, self.hs = [], []

    def __call__(self, x):
        h = self.ffn.activations(x)
        self.xs.append(x.reshape(-1, x.shape[-1]).astype(mx.float16))  # (B*L, d_model)
        self.hs.append(mx.abs(h).reshape(-1, h.shape[-1]).astype(mx.float16))  # (B*L, d_ff)
        if self.last:
            raise _LastLayerDone
        return self.ffn(x)


@dataclass
class Activations:
    xs: List[np.ndarray]  # per layer (N, d_model) float16: FFN inputs
    hs: List[np.ndarray]  # per layer (N, d_ff) float16: |hidden activation|
    seq_len: int  # tokens are N // seq_len consecutive windows


def collect(model, windows: np.ndarray, batch: int = 8, progress: bool = True) -> Activations:
    """Dense forward passes over token windows, recording every layer's FFN."""
    layers = model.layers
    originals = [l.mlp for l in layers]
    recorders = [_Recorder(f, i == len(originals) - 1) for i, f in enumerate(originals)]
    for l, r in zip(layers, recorders):
        l.mlp = r
    try:
        for i in tqdm(range(0, len(windows), batch), desc="dense pass over calibration text",
                      unit="batch", disable=not progress):
            try:
                model(mx.array(windows[i : i + batch]))
            except _LastLayerDone:
                pass
            mx.eval([r.xs[-1] for r in recorders] + [r.hs[-1] for r in recorders])
    finally:
        for l, f in zip(layers, originals):
            l.mlp = f
    xs = [np.array(mx.concatenate(r.xs)) for r in recorders]
    hs = [np.array(mx.concatenate(r.hs)) for r in recorders]
    return Activations(xs, hs, windows.shape[1])


def thresholds(acts: Activations, activation: str, sparsity: float) -> List[float]:
    """Per-layer t_l: 0 for ReLU models, else the `sparsity` quantile of |h| in that layer."""
    if is_relu(activation):
        return [0.0] * len(acts.hs)
    return [float(np.quantile(h.astype(np.float32), sparsity)) for h in acts.hs]


def active_masks(acts: Activations, ts: List[float]) -> List[np.ndarray]:
    """Per layer (N, d_ff) bool: the true active sets."""
    return [h.astype(np.float32) > t for h, t in zip(acts.hs, ts)]
