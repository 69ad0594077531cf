"""The architectures flash mode runs, in one table: where each one's FFN sits and what it is.

Every model class but OPT's is mlx-lm's own (`mlx_lm.models.<module>`, maintained by its authors):
the modes take it as it is and replace each layer's FFN module, `layers[i].mlp` in every
architecture here, with their provider (dense, naive mmap or flash), so attention, norms, RoPE,
KV caches and the LM head are mlx-lm's code. What a provider needs to know of the FFN is in the
table: which config keys give its width, activation and biases, and how its weights are named.

Activations, as `FFNSpec.activation` names them (models/ffn.py):
- "silu" / "gelu..." GLUs: h = act(gate x) * (up x); no neuron is exactly zero, sparsity is a
  calibrated threshold on |h| (flash/sparsity.py).
- "relu" (OPT, ReluLLaMA: `hidden_act` "relu" in a llama config), "fatrelu" (ProSparse: x where
  x >= t, else 0, on the gate; t = `hidden_act_param`), "drelu" (TurboSparse-Mistral, Bamboo: ReLU
  on both gate and up): most neurons exactly zero; a neuron is active iff its h is not zero, as in
  the paper.

mlx-lm's Llama MLP computes SiLU whatever `hidden_act` says; ours follows the config, as the
checkpoint's authors (and transformers) do, so a ReluLLaMA computes ReLU.
"""

import importlib
from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import FlashError
from .ffn import ACTIVATIONS, FFNSpec

RELU_FAMILY = ("relu", "fatrelu", "drelu")


@dataclass(frozen=True)
class MoE:
    """Where a mixture-of-experts architecture keeps its routed experts: a block in each MoE layer
    with a router (d_model -> experts logits; top-k picks a token's experts) and mlx-lm's SwitchGLU,
    which stacks the experts' gate, up and down projections (experts, out, in). Layers without the
    block (Qwen3-MoE's `mlp_only_layers`) are dense and stay resident, as do shared experts."""

    block: str  # the decoder layer's attribute holding the MoE block
    switch: str  # the block's SwitchGLU: what flash mode streams (flash/experts.py)
    router: str  # the block's router Linear
    experts: str  # config key: routed experts per MoE layer
    d_ff: str  # config key: an expert's hidden width
    top_k: str = "num_experts_per_tok"  # config key: experts per token


@dataclass(frozen=True)
class Architecture:
    module: str  # the module that defines Model and ModelArgs
    ffn: str = "gate_proj, up_proj, down_proj"  # how the FFN's weights are named (documentation)
    d_ff: str = "intermediate_size"  # config key: neurons per FFN
    act_key: str = "hidden_act"  # config key: the FFN's activation
    act_default: str = "silu"  # without that key (what the model class computes)
    glu: bool = True  # a gate matrix next to up
    fused: bool = False  # gate and up in one matrix `gate_up_proj`, gate rows first (Phi-3)
    bias_key: str = "mlp_bias"  # config key: FFN biases
    bias_default: bool = False
    drelu: bool = False  # a "relu" activation applies to up as well as the gate (dReLU)
    skip: tuple = ()  # checkpoint keys with these parts are not the model's (predictors shipped inside)
    nested: Optional[str] = None  # the config key holding the language model's own config (multimodal)
    norms: str = "post_attention_layernorm before"  # the norms around the FFN (documentation)
    moe: Optional[MoE] = None  # routed experts, streamed whole (expert_bundles.py), instead of neurons


ARCHITECTURES = {
    "llama": Architecture("mlx_lm.models.llama"),
    "mistral": Architecture("mlx_lm.models.llama"),  # mlx-lm's own remapping
    "qwen2": Architecture("mlx_lm.models.qwen2"),
    "qwen3": Architecture("mlx_lm.models.qwen3"),
    "gemma3_text": Architecture("mlx_lm.models.gemma3_text", act_key="hidden_activation",
                                act_default="gelu_pytorch_tanh",  # GeGLU
                                norms="pre_feedforward_layernorm before, post_feedforward_layernorm after"),
    # Gemma 3 4B-27B as published (image-text): mlx-lm's class keeps the language model and drops the
    # vision tower in its sanitize; the geometry is in "text_config"
    "gemma3": Architecture("mlx_lm.models.gemma3", act_key="hidden_activation", act_default="gelu_pytorch_tanh",
                           nested="text_config",
                           norms="pre_feedforward_layernorm before, post_feedforward_layernorm after"),
    "phi3": Architecture("mlx_lm.models.phi3", ffn="gate_up_proj (gate rows, then up rows), down_proj",
                         fused=True),
    "olmo2": Architecture("mlx_lm.models.olmo2", norms="none before, post_feedforward_layernorm after"),
    # ProSparse-Llama-2 (SparseLLM/prosparse-llama-2-7b, remote code): a Llama with "hidden_act": "fatrelu"
    # and its threshold in "hidden_act_param" (0.01)
    "sparsellama": Architecture("mlx_lm.models.llama"),
    # Bamboo and TurboSparse-Mistral (PowerInfer/*, remote code): a Mistral whose MLP is
    # down(relu(gate x) * relu(up x)); TurboSparse ships its own predictors inside the MLP
    "bamboo": Architecture("mlx_lm.models.llama", act_default="relu", drelu=True, skip=(".mlp.predictor.",)),
    "granite": Architecture("mlx_lm.models.granite", norms="post_attention_layernorm before; residual_multiplier"),
    # mixtures of experts: mlx-lm's MoE blocks are kept, their SwitchGLU streamed expert by expert
    "qwen3_moe": Architecture("mlx_lm.models.qwen3_moe", ffn="mlp.switch_mlp: gate_proj, up_proj, down_proj",
                              moe=MoE("mlp", "switch_mlp", "gate", "num_experts", "moe_intermediate_size")),
    "mixtral": Architecture("mlx_lm.models.mixtral", ffn="block_sparse_moe.switch_mlp: gate_proj, up_proj, down_proj",
                            moe=MoE("block_sparse_moe", "switch_mlp", "gate", "num_local_experts",
                                    "intermediate_size")),
    "gpt_oss": Architecture("mlx_lm.models.gpt_oss", ffn="mlp.experts: gate_proj, up_proj, down_proj (biases)",
                            act_default="swiglu_oai", bias_default=True, norms="post_attention_layernorm before",
                            moe=MoE("mlp", "experts", "router", "num_local_experts", "intermediate_size")),
    "opt": Architecture("mlx_flash.models.opt", ffn="fc1, fc2 (renamed up_proj, down_proj)", d_ff="ffn_dim",
                        act_key="activation_function", act_default="relu", glu=False, bias_key="enable_bias",
                        bias_default=True, norms="final_layer_norm before (pre-LN) or after (post-LN)"),
}


def moe_blocks(model) -> dict:
    """{layer index: its MoE block} of a model built from mlx-lm's class, for the layers that route to
    experts (dense layers, and every layer of an architecture without experts, are left out)."""
    moe = ARCHITECTURES[model.model_type].moe if model.model_type in ARCHITECTURES else None
    if moe is None:
        return {}
    blocks = {l: getattr(layer, moe.block, None) for l, layer in enumerate(model.layers)}
    return {l: b for l, b in blocks.items() if b is not None and moe.switch in b}


def architecture(config: dict) -> Architecture:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise FlashError(f"model type '{model_type}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]


def model_classes(config: dict):
    """(Model, ModelArgs) for a config: mlx-lm's classes, or ours where mlx-lm has none."""
    module = importlib.import_module(architecture(config).module)
    return module.Model, module.ModelArgs


def text_config(config: dict) -> dict:
    """The language model's config: the config itself, or its nested part (with the top level's
    vocabulary size, which mlx-lm's Gemma 3 class gives it too)."""
    nested = architecture(config).nested
    if nested is None:
        return config
    inner = config.get(nested) or {}
    return {**inner, "vocab_size": config.get("vocab_size", inner.get("vocab_size"))}


def activation(config: dict) -> Tuple[str, float]:
    """The FFN's activation as FFNSpec names it, and FATReLU's threshold (0 for the others)."""
    arch = architecture(config)
    config = text_config(config)
    act = config.get(arch.act_key) or arch.act_default
    if act == "fatrelu":  # ProSparse: `hidden_act_param` is the threshold below which values are zeroed
        return act, float(config.get("hidden_act_param", 0.0))
    if act == "relu" and arch.drelu:
        return "drelu", 0.0
    return act, 0.0


def ffn_spec(config: dict) -> FFNSpec:
    arch = architecture(config)
    act, threshold = activation(config)
    config = text_config(config)
    d_model = config["hidden_size"]
    if arch.moe is not None:  # one expert's FFN
        return FFNSpec(d_model, config[arch.moe.d_ff], True, bool(config.get(arch.bias_key, arch.bias_default)),
                       act)
    return FFNSpec(d_model, config[arch.d_ff], arch.glu, bool(config.get(arch.bias_key, arch.bias_default)),
                   act, threshold)


def supported_activation(spec: FFNSpec) -> Optional[str]:
    """None, or why the FFN's activation cannot run."""
    if spec.activation not in ACTIVATIONS:
        return f"FFN activation '{spec.activation}' is not supported (supported: {', '.join(sorted(ACTIVATIONS))})"
    return None
