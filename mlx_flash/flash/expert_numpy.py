"""A prompt's routed experts multiplied in numpy on MLX's CPU backend (the experts' counterpart of
flash/prefill.py's NumpyLinear).

mlx-lm's SwitchGLU computes a prompt's (token, expert) pairs with gather_qmm / gather_mm, which MLX's
CPU backend runs many times slower than numpy's BLAS (`python -m mlx_flash.bench.moe --rows
prompt-groups,prompt-pass`: README, "A prompt: groups or one pass"). Within flash.prefill's
`numpy_linears`, every SwitchGLU of the model (dense mode's, flash mode's slot buffers) is a
`NumpySwitchGLU`, and flash mode's prompt pass (flash/expert_prompt.py) multiplies its slices the same
way. Per expert, the pairs routed to it:

    xe = x[tokens routed to e]                                  # (m, d_model) float32
    g, u = xe @ gate_e.T (+ bias), xe @ up_e.T (+ bias)         # (m, d_ff); e's weights dequantized once
    y[pairs] = act(u, g) @ down_e.T (+ bias)                    # (m, d_model)

e's weights are sliced from numpy views of the stacked arrays (the slot buffer itself in flash mode) and
dequantized by flash.sparsity.dequantize (affine 4 and 8 bits in numpy), MLX for other modes (mxfp4);
the products run on one BLAS thread (`one_blas_thread`).

with the activation of the SwitchGLU (SwiGLU: silu(g) * u for Qwen3-MoE and Mixtral; gpt-oss's
SwigluOAI: the gate clipped from above, the linear part clipped both ways and shifted by one, exactly as
mlx-lm's `swiglu_oai`; any other by MLX). The output is the SwitchGLU's, (..., k, d_model), in its dtype:
the MoE block weighs the k outputs by the router's scores in mlx-lm's own code. Decoding (one token)
stays in MLX. The plan counts one expert's float32 weights and a chunk's pairs (flash.budget).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.switch_layers import SwiGLU, SwitchGLU

from .sparsity import dequantize, swap_modules

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
NUMPY_DTYPES = (mx.float16, mx.float32, mx.uint32, mx.uint8)  # MLX arrays numpy views without a copy


class Stacked:
    """A SwitchLinear's or QuantizedSwitchLinear's stacked parameters (experts, ...), as numpy views of the
    same memory where numpy has the dtype (bfloat16 has none: those are sliced by MLX, expert by expert)."""

    def __init__(self, lin: nn.Module):
        self.lin = lin
        self.np = {k: np.asarray(v) for k, v in lin.items() if isinstance(v, mx.array) and v.dtype in NUMPY_DTYPES}

    def float32(self, part: str, e: int) -> np.ndarray:
        """Expert e's slice of parameter `part`, float32."""
        v = self.np.get(part)
        return v[e].astype(np.float32) if v is not None else np.asarray(self.lin[part][e].astype(mx.float32))

    def raw(self, part: str, e: int):
        v = self.np.get(part)
        return v[e] if v is not None else self.lin[part][e]


def expert_matrix(lin: nn.Module, e: int, stacked: "Stacked" = None) -> np.ndarray:
    """Expert e's (out, in) weight of a SwitchLinear or QuantizedSwitchLinear, float32 numpy."""
    st = stacked or Stacked(lin)
    if "scales" not in lin:
        return st.float32("weight", e)
    mode = getattr(lin, "mode", "affine")
    if mode == "affine":
        return dequantize(st.raw("weight", e), st.float32("scales", e), st.float32("biases", e), lin.group_size,
                          lin.bits)
    # another of MLX's modes (gpt-oss's mxfp4): no biases, MLX dequantizes
    return np.asarray(mx.dequantize(lin.weight[e], lin.scales[e], None, lin.group_size, lin.bits, mode=mode)
                      .astype(mx.float32))


def _sigmoid_times(a: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """a * sigmoid(scale * a), into a new array."""
    h = np.multiply(a, -scale)
    with np.errstate(over="ignore"):  # exp(-a) = inf: the product is -0
        np.exp(h, out=h)
    h += 1
    return np.divide(a, h, out=h)


def activation(act: nn.Module, u: np.ndarray, g: np.ndarray) -> np.ndarray:
    """SwitchGLU's activation(x_up, x_gate) on (m, d_ff) float32 arrays (g may be overwritten)."""
    if isinstance(act, SwiGLU):  # silu(gate) * up
        h = _sigmoid_times(g)
        h *= u
        return h
    if isinstance(act, SwigluOAI):  # mlx_lm.models.activations.swiglu_oai
        limit = act._limit
        np.minimum(g, limit, out=g)
        h = _sigmoid_times(g, act._alpha)
        h *= np.clip(u, -limit, limit) + 1.0
        return h
    return np.asarray(act(mx.array(u), mx.array(g)).astype(mx.float32))


def output_dtype(glu: nn.Module, x_dtype) -> mx.Dtype:
    """The dtype SwitchGLU returns for inputs of `x_dtype` (gather_mm's, gather_qmm's, with the biases)."""
    dtype = x_dtype
    for proj in PROJECTIONS:
        lin = getattr(glu, proj)
        dtype = mx.result_type(dtype, lin.scales.dtype if "scales" in lin else lin.weight.dtype)
        if "bias" in lin:
            dtype = mx.result_type(dtype, lin.bias.dtype)
    return dtype


_blas = None  # threadpoolctl's view of numpy's BLAS, made on first use


def one_blas_thread():
    """Within: numpy's BLAS on one thread. An expert's few tokens (N k / E of them: 8 for 128 tokens of
    Qwen3-30B-A3B) make small products, which OpenBLAS's threads slow down many times on this project's
    2-core machines (`python -m mlx_flash.bench.moe --rows prompt-pass`: README, "A prompt: groups or one
    pass")."""
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        _blas = ThreadpoolController()
    return _blas.limit(limits=1, user_api="blas")


def expert_pairs(glu: nn.Module, x: np.ndarray, tokens: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """SwitchGLU `glu`'s outputs for pairs (token tokens[i] of x, expert experts[i]): (pairs, d_model)
    float32. x: (N, d_model) float32. Each expert's weights are dequantized once, for all its pairs."""
    with one_blas_thread():
        return _expert_pairs(glu, x, tokens, experts)


def _expert_pairs(glu: nn.Module, x: np.ndarray, tokens: np.ndarray, experts: np.ndarray) -> np.ndarray:
    out = np.empty((len(experts), getattr(glu, "down_proj").weight.shape[1]), dtype=np.float32)
    order = np.argsort(experts, kind="stable")
    ranked = experts[order]
    cuts = np.flatnonzero(np.diff(ranked)) + 1
    gate, up, down = (getattr(glu, p) for p in PROJECTIONS)
    sg, su, sd = (Stacked(lin) for lin in (gate, up, down))
    for run in np.split(order, cuts) if len(order) else []:
        e = int(experts[run[0]])
        xe = x[tokens[run]]  # (m, d_model)
        g, u = xe @ expert_matrix(gate, e, sg).T, xe @ expert_matrix(up, e, su).T  # (m, d_ff)
        if "bias" in gate:
            g += sg.float32("bias", e)
        if "bias" in up:
            u += su.float32("bias", e)
        h = activation(glu.activation, u, g)
        y = h @ expert_matrix(down, e, sd).T  # (m, d_model)
        if "bias" in down:
            y += sd.float32("bias", e)
        out[run] = y
    return out


class NumpySwitchGLU(nn.Module):
    """Stands in for mlx-lm's SwitchGLU `glu` during a prompt (flash.prefill.numpy_linears): the same call,
    (x (..., d_model), indices (..., k)) -> (..., k, d_model), multiplied in numpy expert by expert."""

    def __init__(self, glu: SwitchGLU):
        super().__init__()
        self.glu = glu
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k = indices.shape[-1]
        xs = np.asarray(x.astype(mx.float32)).reshape(-1, x.shape[-1])  # (N, d_model)
        experts = np.asarray(indices).reshape(-1).astype(np.int64)  # pair p: token p // k
        y = expert_pairs(self.glu, xs, np.repeat(np.arange(len(xs)), k), experts)
        return mx.array(y).reshape(*indices.shape, y.shape[-1]).astype(output_dtype(self.glu, x.dtype))


def swap_switches(module: nn.Module, swapped: list):
    """Put a NumpySwitchGLU in place of every SwitchGLU under `module` (sparsity.swap_modules)."""
    swap_modules(module, swapped, lambda c: NumpySwitchGLU(c) if isinstance(c, SwitchGLU) else None, NumpySwitchGLU)
