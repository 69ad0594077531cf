"""Low-rank activation predictors (paper Section 3.1, "Selective persistence strategy").

One per layer: z = B(A x) + b, rank r (the paper: 128, larger for the last
layers), reading the FFN input x and scoring each neuron; neurons with
z > tau_l are loaded. Trained with a weighted binary cross-entropy that
balances the rare positives, then tau_l is set on held-out tokens so that
the predictor reaches a target recall: it over-predicts rather than miss.

What a miss costs differs by neuron: neuron j's contribution to the FFN output at
token t is c_tj = |h_tj| * ||down_j||. With weight="contribution" each positive's
loss is weighted by its contribution (relative to the mean positive's), so the
predictor spends its rank on the neurons whose miss costs most; every report
gives both the count recall and the contribution recall (the share of the
FFN output's energy, sum of c_tj^2, that the predicted neurons carry).

Where it runs: MLX on a GPU; on MLX's CPU backend the same training (same initial
weights, batches, loss and AdamW steps: the thresholds agree to 4 digits) runs in numpy,
whose BLAS does these float32 matmuls many times faster there (`python -m mlx_flash.probe
matmul` measures both; on 2 x86 cores numpy 70-100 GFLOP/s at 128-512 rows, MLX 3-4).
"""

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

TRAIN_BATCH = 512  # tokens per optimizer step
# recall levels whose thresholds are stored, so flash mode can trade quality for reads at load time
RECALL_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


class LowRankPredictor(nn.Module):
    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)  # A: (rank, d_model)
        self.up = nn.Linear(rank, d_ff)  # B: (d_ff, rank), b: (d_ff,)

    def __call__(self, x: mx.array) -> mx.array:
        return self.up(self.down(x))  # (..., d_ff) scores


def default_ranks(n_layers: int, d_model: int, rank: int = None, last_rank: int = None, last_layers: int = 4):
    """The paper's recipe scaled to the model: rank 128 (d_model/4 when smaller), 4x for the last layers."""
    rank = rank or min(128, max(16, d_model // 4))
    last_rank = last_rank or min(4 * rank, d_model)
    return [last_rank if l >= n_layers - last_layers else rank for l in range(n_layers)]


@dataclass
class LayerReport:
    recall: float  # share of truly active neurons that were predicted
    precision: float  # share of predicted neurons that were truly active
    predicted_share: float  # predicted neurons per token / d_ff
    true_share: float  # active neurons per token / d_ff
    tau: float  # score threshold
    contribution_recall: float = 1.0  # share of the active neurons' energy (sum of c^2) predicted or pinned
    union_p99: int = 0  # neurons held by a window at this threshold (99th percentile), set by the caller


def numpy_is_faster() -> bool:
    """Whether calibration's float32 matmuls go to numpy: on MLX's CPU backend (see the module's note)."""
    return mx.default_device() == mx.cpu


def train_layer(x: np.ndarray, y: np.ndarray, rank: int, epochs: int = 8, batch: int = TRAIN_BATCH, lr: float = 2e-3,
                target_recall: float = 0.98, val_share: float = 0.1, seed: int = 0, contribution=None,
                weight: str = "count", covered=None, seconds: Optional[dict] = None):
    """Train one predictor on (N, d_model) inputs and (N, d_ff) bool targets.

    contribution: (N, d_ff) c_tj, for weight="contribution" and the contribution recall;
    covered: (N,) energy the predictor need not find (pinned neurons'), for the contribution recall.
    Returns (predictor, {recall: LayerReport}) measured on the last `val_share` of the tokens,
    one report per recall level: the threshold tau that reaches it and what it costs.
    seconds: if given, the time spent training and measuring the levels is added to its
    "training" and "levels".
    """
    start = time.perf_counter()
    n = len(x)
    n_val = max(1, int(n * val_share))
    xv, yv = x[n - n_val :], y[n - n_val :]
    p = float(y.mean())
    # positives are rare in ReLU models (3% in OPT): weight them up, but keep the loss sane
    pos_weight = float(np.clip((1 - p) / max(p, 1e-4), 1.0, 30.0)) ** 0.5
    if weight == "contribution" and contribution is not None and y.any():
        c = contribution[: n - n_val].astype(np.float32, copy=False)
        # a positive weighs what its miss costs, relative to the mean positive's (clipped: no neuron rules)
        wt = np.clip(c / max(float(c[y[: n - n_val]].mean()), 1e-12), 0.05, 20.0)
        wt *= pos_weight  # (N, d_ff)
    elif weight in ("count", "contribution"):
        wt = None  # every positive weighs pos_weight
    else:
        raise ValueError(f"unknown weight {weight!r}")

    mx.random.seed(seed)
    model = LowRankPredictor(x.shape[1], y.shape[1], rank)
    model.up.bias = mx.full(model.up.bias.shape, math.log(max(p, 1e-4) / max(1 - p, 1e-4)))
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(n - n_val) for _ in range(epochs)]  # each epoch's batches
    if numpy_is_faster():
        _fit_numpy(model, x[: n - n_val], y[: n - n_val], pos_weight if wt is None else wt, orders, batch, lr)
    else:
        _fit_mlx(model, mx.array(x[: n - n_val]), mx.array(y[: n - n_val].astype(np.float32)),
                 pos_weight if wt is None else mx.array(wt), orders, batch, lr)

    trained = time.perf_counter()
    z = scores(model, xv)  # (n_val, d_ff)
    cv = None if contribution is None else contribution[n - n_val :].astype(np.float32)
    kv = None if covered is None else covered[n - n_val :]
    levels = sorted(set(RECALL_LEVELS) | {target_recall})
    reports = {r: report(z, yv, recall_threshold(z, yv, r), cv, kv) for r in levels}
    if seconds is not None:
        seconds["training"] = seconds.get("training", 0.0) + trained - start
        seconds["levels"] = seconds.get("levels", 0.0) + time.perf_counter() - trained
    return model, reports


def _fit_mlx(model, xt: mx.array, yt: mx.array, wt, orders: list, batch: int, lr: float):
    """AdamW on the weighted BCE in MLX; wt: (N, d_ff) positives' weights, or one float for all."""
    opt = optim.AdamW(learning_rate=lr, weight_decay=1e-4)

    def loss_fn(m, xb, yb, wb):
        z = m(xb)
        return mx.mean(wb * yb * nn.softplus(-z) + (1 - yb) * nn.softplus(z))

    step = nn.value_and_grad(model, loss_fn)
    for order in orders:
        perm = mx.array(order)
        for i in range(0, len(order), batch):
            idx = perm[i : i + batch]
            loss, grads = step(model, xt[idx], yt[idx], wt[idx] if isinstance(wt, mx.array) else wt)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)


def _fit_numpy(model, x: np.ndarray, y: np.ndarray, wt, orders: list, batch: int, lr: float,
               weight_decay: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8):
    """The same training as _fit_mlx, in numpy: hand-written gradients and MLX's AdamW (no bias correction).

    Loss per score z = B(A x) + b: w y softplus(-z) + (1 - y) softplus(z), mean over the batch and
    the neurons; its gradient is a (sigmoid(z) - y) with a = w for positives and 1 for the others.
    wt: (N, d_ff) float32 positives' weights (made into `a` in place), or one float for all."""
    if isinstance(wt, np.ndarray):
        a = wt
        np.copyto(a, np.float32(1), where=~y)
    else:
        a = np.where(y, np.float32(wt), np.float32(1))  # (N, d_ff) float32
    A, B, b = (np.array(w) for w in (model.down.weight, model.up.weight, model.up.bias))  # (r, D) (F, r) (F,)
    params = (A, B, b)
    first = [np.zeros_like(w) for w in params]  # Adam's moments
    second = [np.zeros_like(w) for w in params]
    lr = np.float32(lr)
    decay = 1 - lr * np.float32(weight_decay)
    with np.errstate(over="ignore"):  # exp(-z) = inf for very negative z: sigmoid 0, as it should be
        for order in orders:
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                xb = x[idx].astype(np.float32)  # (b, D)
                u = xb @ A.T  # (b, r)
                g = u @ B.T  # (b, F) scores, then their gradient in place
                g += b
                np.negative(g, out=g)
                np.exp(g, out=g)
                g += 1
                np.reciprocal(g, out=g)  # sigmoid(z)
                g -= y[idx]
                g *= a[idx]
                g *= np.float32(1 / g.size)  # dLoss/dz
                du = g @ B  # (b, r)
                grads = (du.T @ xb, g.T @ u, g.sum(axis=0))  # dA, dB, db
                for w, dw, m, v in zip(params, grads, first, second):
                    w *= decay
                    m *= betas[0]
                    m += (1 - betas[0]) * dw
                    v *= betas[1]
                    v += (1 - betas[1]) * np.square(dw)
                    w -= lr * m / (np.sqrt(v) + eps)
    model.down.weight, model.up.weight, model.up.bias = (mx.array(w) for w in params)


def scores(predictor, x: np.ndarray) -> np.ndarray:
    """(N, d_ff) float32 scores of (N, d_model) inputs (numpy on MLX's CPU backend, else MLX)."""
    if numpy_is_faster():
        A, B, b = (np.asarray(v.astype(mx.float32)) for v in (predictor.down.weight, predictor.up.weight,
                                                                predictor.up.bias))
        z = (x.astype(np.float32) @ A.T) @ B.T
        z += b
        return z
    return np.array(predictor(mx.array(x)).astype(mx.float32))


def recall_threshold(z: np.ndarray, y: np.ndarray, target_recall: float) -> float:
    """The largest tau with recall >= target: the (1 - target) quantile of positives' scores."""
    pos = z[y]
    return float(np.quantile(pos, 1 - target_recall)) if pos.size else 0.0


def report(z: np.ndarray, y: np.ndarray, tau: float, contribution=None, covered=None) -> LayerReport:
    pred = z > tau
    hit = np.logical_and(pred, y)
    tp = hit.sum()
    energy = 1.0
    if contribution is not None:
        c2 = np.square(contribution)
        extra = float(covered.sum()) if covered is not None else 0.0
        energy = (float(c2[hit].sum()) + extra) / max(float(c2[y].sum()) + extra, 1e-30)
    return LayerReport(
        recall=float(tp / max(y.sum(), 1)),
        precision=float(tp / max(pred.sum(), 1)),
        predicted_share=float(pred.mean()),
        true_share=float(y.mean()),
        tau=float(tau),
        contribution_recall=energy,
    )


def window_max(z: np.ndarray, window: int, seq_len: int) -> np.ndarray:
    """(N, d_ff): each token's scores maxed over the window of `window` tokens that ends at it; windows do
    not cross the boundaries of the calibration sequences (N // seq_len consecutive ones)."""
    m = z.reshape(-1, seq_len, z.shape[-1]).copy()  # (sequences, seq_len, d_ff)
    for k in range(1, min(window, seq_len)):
        np.maximum(m[:, k:], z.reshape(m.shape)[:, :-k], out=m[:, k:])  # token t also sees token t - k
    return m.reshape(z.shape)


def window_union_p99(predictor, x: np.ndarray, taus: List[float], window: int, seq_len: int) -> List[int]:
    """Per threshold tau: the neurons a window of `window` tokens holds (99th percentile over the tokens
    x, (N, d_model)). A neuron is in a window's union at tau iff its largest score in the window is
    above tau: the windowed maxima are computed once, one calibration sequence at a time."""
    sizes = [[] for _ in taus]
    for s in range(0, len(x), seq_len):
        m = window_max(scores(predictor, x[s : s + seq_len]), window, seq_len)  # (seq_len, d_ff)
        for k, tau in enumerate(taus):
            sizes[k].append(np.count_nonzero(m > tau, axis=1))
    return [int(np.percentile(np.concatenate(v), 99)) for v in sizes]


LOOKAHEAD = "lookahead."  # key prefix of the lookahead predictors: layer l's, reading layer l-1's input


def save_predictors(predictors: List[Optional[LowRankPredictor]], prefix: str = "") -> Dict[str, mx.array]:
    """Flat float16 tensors for predictors.safetensors (None: no predictor for that layer)."""
    out = {}
    for l, p in enumerate(predictors):
        if p is not None:
            out[f"{prefix}{l}.down.weight"] = p.down.weight.astype(mx.float16)
            out[f"{prefix}{l}.up.weight"] = p.up.weight.astype(mx.float16)
            out[f"{prefix}{l}.up.bias"] = p.up.bias.astype(mx.float16)
    return out


def load_predictors(weights: Dict[str, mx.array], n_layers: int, prefix: str = "") -> List[Optional[LowRankPredictor]]:
    out = []
    for l in range(n_layers):
        head = f"{prefix}{l}."
        if head + "down.weight" not in weights:
            out.append(None)
            continue
        rank, d_model = weights[head + "down.weight"].shape
        d_ff = weights[head + "up.weight"].shape[0]
        p = LowRankPredictor(d_model, d_ff, rank)
        p.load_weights([(k[len(head):], v) for k, v in weights.items() if k.startswith(head)])
        p.freeze()
        out.append(p)
    return out
