"""A prompt's matmuls on the fastest engine of the device: numpy's BLAS on MLX's CPU backend.

On this project's x86 machines MLX's CPU backend multiplies a prompt's (N, d) activations by a
matrix many times slower than numpy's BLAS on the same cores (`bench --prompts`: README, "Time to
first token", compares the two on the same prompt). Decoding multiplies one token,
where dequantizing a matrix for numpy would cost more than the product: it stays in MLX. So a
prompt's tokens, all but the last, run through the layers with every linear of the resident part
in numpy (flash.sparsity's NumpyLinear: dequantized at float32 one matrix at a time), and so does
every mixture of experts' SwitchGLU, expert by expert (flash.expert_numpy), filling the KV cache;
flash mode's prompt passes (flash.prompt, flash.expert_prompt) multiply their slices in numpy the same way. The
last token then runs through mlx-lm's loop as usual and gives the first logits. On a GPU (Metal,
CUDA) everything stays in MLX. The plan counts the float32 copy of the largest matrix (flash.budget).
"""

from contextlib import contextmanager
from typing import List

import mlx.core as mx

from .expert_numpy import swap_switches
from .predictor import numpy_is_faster
from .sparsity import swap_linears

MIN_TOKENS = 2  # a prompt step this long or longer goes to numpy (one token stays a mat-vec in MLX)


@contextmanager
def numpy_linears(model):
    """Within: the linears of every layer (attention, a dense FFN, routers) and the routed experts multiply
    in numpy; the embeddings and the LM head stay MLX's (a prompt's logits are never computed, lazily)."""
    swapped = []
    try:
        for layer in model.layers:
            swap_linears(layer, swapped)
            swap_switches(layer, swapped)
        yield
    finally:
        for parent, key, linear in swapped:
            parent[key] = linear


def use_numpy(tokens: int) -> bool:
    return numpy_is_faster() and tokens >= MIN_TOKENS


def prefill(model, cache: list, ids: List[int], chunk: int):
    """Run `ids` through the model into `cache`, `chunk` tokens per forward pass, their logits not
    computed (as mlx-lm's generate_step does for all but a prompt's last token)."""
    if not ids:
        return
    with numpy_linears(model) if use_numpy(len(ids)) else _nothing():
        for i in range(0, len(ids), chunk):
            model(mx.array(ids[i : i + chunk])[None], cache=cache)
            mx.eval([c.state for c in cache])


@contextmanager
def _nothing():
    yield
