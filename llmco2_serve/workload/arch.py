"""Model architecture read from a Hugging Face ``config.json``.

Every field that changes the work of a forward pass is read here, once, into a frozen
:class:`ModelArch`. Missing or contradictory fields raise :class:`ArchitectureError` naming the
field; an unknown ``model_type`` whose fields look like a standard decoder is accepted with a
logged warning. Nothing is defaulted silently: every default below is a documented property of a
model family (e.g. Bloom's MLP is always ``4 * hidden``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, asdict
from typing import Any, Mapping

log = logging.getLogger(__name__)


class ArchitectureError(ValueError):
    """The config cannot describe a decoder we can model. The message names the field."""


# Families whose layer layout we model explicitly. Values: (gated MLP, norm type, default act).
_GATED_RMS = (True, "rmsnorm", "silu")
KNOWN_FAMILIES: dict[str, tuple[bool, str, str]] = {
    "llama": _GATED_RMS,
    "mistral": _GATED_RMS,
    "mixtral": _GATED_RMS,
    "qwen2": _GATED_RMS,
    "qwen2_moe": _GATED_RMS,
    "qwen3": _GATED_RMS,
    "qwen3_moe": _GATED_RMS,
    "gemma": (True, "rmsnorm", "gelu_pytorch_tanh"),
    "gemma2": (True, "rmsnorm", "gelu_pytorch_tanh"),
    "gemma3_text": (True, "rmsnorm", "gelu_pytorch_tanh"),
    # MoE families of the vLLM benchmark data (issue 7): gpt-oss (clamped SwiGLU experts with biases,
    # attention sinks, alternating 128-token windows), Llama 4 (top-1 experts + shared expert,
    # chunked attention, dense/MoE interleave in Maverick), DeepSeek-V3 (MLA, shared experts,
    # first layers dense).
    "gpt_oss": _GATED_RMS,
    "llama4_text": _GATED_RMS,
    "deepseek_v3": _GATED_RMS,
    "phi3": _GATED_RMS,
    "bloom": (False, "layernorm", "gelu"),
    # GELU/ReLU two-matrix MLP and LayerNorm with biases; field names differ per family (_parse).
    "gpt2": (False, "layernorm", "gelu_new"),
    "gpt_neox": (False, "layernorm", "gelu"),
    "falcon": (False, "layernorm", "gelu"),
    "opt": (False, "layernorm", "relu"),
}

# The MLP width under the names families give it (Llama, Falcon/ChatGLM, GPT-2, OPT).
_INTERMEDIATE_FIELDS = ("intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim")

# Families whose attention projections carry biases (q/k/v only for qwen2; all for bloom).
_QKV_BIAS_FAMILIES = {"qwen2", "qwen2_moe"}

# Multimodal wrappers whose decoder is the nested ``text_config`` (vision towers are not priced).
_TEXT_WRAPPERS = {"gemma3": "gemma3_text", "llama4": "llama4_text"}

# Fields a published config may leave out because the family's HF config class defaults them
# (gemma-3-4b/12b/27b ship a text_config without vocab_size, head_dim, num_key_value_heads).
# Values: transformers' Gemma3TextConfig() defaults (tests/test_arch.py checks them against it).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3_text": {"vocab_size": 262208, "head_dim": 256, "num_key_value_heads": 4, "sliding_window": 4096,
                    "sliding_window_pattern": 6},
}

# Hybrid state-space models: their Mamba/SSM mixers have no node in the kernel graph.
_HYBRID_SSM_TYPES = {"nemotron_h", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid",
                     "plamo2", "mamba", "mamba2", "falcon_mamba"}
_HYBRID_SSM_FIELDS = ("hybrid_override_pattern", "mamba_num_heads", "mamba_d_state", "ssm_state_size",
                      "layers_block_type", "attn_layer_period", "mamba_head_dim")


@dataclass(frozen=True)
class ModelArch:
    """What a transformer decoder does per token, independent of hardware.

    ``moe_num_experts == 0`` means a dense MLP. ``sliding_window`` is ``None`` for full attention;
    ``sliding_window_layer_fraction`` is the share of layers that use it (Gemma2 alternates).
    """

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    gated_mlp: bool
    norm_type: str  # "rmsnorm" | "layernorm"
    activation: str
    attention_bias: str  # "none" | "qkv" | "all"
    mlp_bias: bool
    qk_norm: bool  # Qwen3: per-head RMSNorm on q and k
    norms_per_layer: int  # 2 for most, 4 for Gemma2 (pre/post attention and MLP)
    embedding_norm: bool  # Bloom: LayerNorm right after the embedding
    moe_num_experts: int = 0
    moe_experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_shared_intermediate_size: int = 0  # Qwen2-MoE shared expert
    sliding_window: int | None = None
    sliding_window_layer_fraction: float = 0.0
    known_family: bool = True
    # Learned absolute position embeddings (GPT-2, OPT): rows of the table (0: rotary/ALiBi, no table).
    position_embeddings: int = 0
    # GPT-NeoX / Falcon "parallel" blocks: x + attn(norm(x)) + mlp(norm'(x)). Same kernels and the same
    # work as the sequential block (vLLM and HF run them one after the other on one stream), so they
    # are priced identically; only the graph's data dependencies differ (the MLP reads the layer input).
    parallel_attn_mlp: bool = False
    # Mixed dense and MoE layers (DeepSeek-V3's first_k_dense_replace, Llama-4 Maverick's interleave):
    # this many layers run a dense MLP of ``intermediate_size``; the others run the experts.
    moe_dense_layers: int = 0
    moe_shared_gate: bool = False  # Qwen2-MoE: sigmoid gate (h -> 1) on the shared expert's output
    moe_router_bias: bool = False  # gpt-oss: the router is a Linear with bias
    moe_expert_bias: bool = False  # gpt-oss: every expert's gate_up and down projections carry biases
    attention_sinks: bool = False  # gpt-oss: one learned logit per head joins every softmax
    # Chunked attention (Llama 4): a query attends only to keys of its own chunk of this many
    # positions; ``attention_chunk_layer_fraction`` of the layers do (the NoPE layers attend fully).
    attention_chunk: int | None = None
    attention_chunk_layer_fraction: float = 0.0
    # Multi-head latent attention (DeepSeek-V2/V3). 0 = not MLA. head_dim is then the query/key
    # head width (nope + rope), ``v_head_dim`` the value head width; the KV cache holds one
    # ``mla_kv_lora_rank + mla_rope_dim`` latent per token and layer, not heads x head_dim.
    mla_q_lora_rank: int = 0
    mla_kv_lora_rank: int = 0
    mla_rope_dim: int = 0
    v_head_dim: int = 0  # 0: equal to head_dim

    @property
    def is_mla(self) -> bool:
        return self.mla_kv_lora_rank > 0

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def kv_cache_elements_per_token(self) -> int:
        """Elements one token adds to one layer's KV cache (K and V, or MLA's latent + rope key)."""
        if self.is_mla:
            return self.mla_kv_lora_rank + self.mla_rope_dim
        return 2 * self.kv_size

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.moe_dense_layers if self.is_moe else 0

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cache_key(self) -> tuple:
        return tuple(sorted(self.to_dict().items()))

    def param_count(self) -> int:
        """Parameters implied by the architecture (embeddings, all layers, final norm, LM head)."""
        from llmco2_serve.workload.graph import weight_params_all_layers  # local import: graph imports arch

        h = self.hidden_size
        norm_params = h * (2 if self.norm_type == "layernorm" else 1)
        embed = self.vocab_size * h
        total = embed + weight_params_all_layers(self) + norm_params
        if self.embedding_norm:
            total += norm_params
        total += self.position_embeddings * h
        if not self.tie_word_embeddings:
            total += embed
        return total

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> "ModelArch":
        """Build from an HF ``config.json`` dict, a path to it, or a model folder containing it."""
        if not isinstance(config, Mapping):
            config = load_hf_config(config)
        return _parse(dict(config))


def load_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` from a file path or a model folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError as e:
        raise ArchitectureError(f"no model config at {path!r}") from e
    except json.JSONDecodeError as e:
        raise ArchitectureError(f"{path!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ArchitectureError(f"{path!r} must hold a JSON object")
    # Multimodal wrappers (e.g. Gemma3, Llava) nest the decoder config.
    if "text_config" in config and "hidden_size" not in config:
        return _unwrap_text_config(config)
    return config


def _unwrap_text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The decoder part of a multimodal wrapper config; its model_type named as HF names it."""
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        raise ArchitectureError("config field 'text_config' must be an object")
    text = dict(text)
    outer = config.get("model_type")
    if "model_type" not in text and outer in _TEXT_WRAPPERS:
        text["model_type"] = _TEXT_WRAPPERS[outer]
    for key in ("torch_dtype", "dtype", "quantization_config"):  # precision lives on the outer config
        if key in config and key not in text:
            text[key] = config[key]
    return text


def _int_field(cfg: Mapping[str, Any], *names: str, required: bool = True, minimum: int = 1) -> int | None:
    for name in names:
        if name in cfg and cfg[name] is not None:
            value = cfg[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                raise ArchitectureError(f"config field {name!r} must be an integer, got {value!r}")
            value = int(value)
            if value < minimum:
                raise ArchitectureError(f"config field {name!r} must be >= {minimum}, got {value}")
            return value
    if required:
        raise ArchitectureError(f"config is missing required field {' or '.join(repr(n) for n in names)}")
    return None


def _parse(cfg: dict[str, Any]) -> ModelArch:
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = _unwrap_text_config(cfg)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureError("config is missing required field 'model_type'")
    hybrid = [k for k in _HYBRID_SSM_FIELDS if k in cfg]
    if model_type in _HYBRID_SSM_TYPES or hybrid:
        raise ArchitectureError(
            f"model_type {model_type!r} is a hybrid state-space (Mamba/SSM) model"
            + (f" (config field {hybrid[0]!r})" if hybrid else "")
            + ": its SSM mixer layers have no node in the kernel graph, so its energy cannot be predicted")
    for key, value in _FAMILY_DEFAULTS.get(model_type, {}).items():
        if cfg.get(key) is None:
            cfg[key] = value
    known = model_type in KNOWN_FAMILIES
    if known:
        gated, norm_type, default_act = KNOWN_FAMILIES[model_type]
    else:
        # A standard decoder: gated MLP when an intermediate size is given, RMSNorm if it says so.
        # Activation under any family's field name; no activation field at all reads as Llama's SiLU.
        act = _activation(cfg) or "silu"
        gated = act in ("silu", "swish") or "mlp_bias" in cfg
        has_ln = any(k in cfg for k in ("layer_norm_eps", "layer_norm_epsilon"))
        norm_type = "layernorm" if has_ln and "rms_norm_eps" not in cfg else "rmsnorm"
        default_act = act
        log.warning(
            "llmco2: model_type %r is not a known family; modelling it as a standard decoder "
            "(gated MLP=%s, %s). Predictions for it are extrapolations.", model_type, gated, norm_type,
        )

    # GPT-2 names its fields n_embd/n_layer/n_head; Bloom's older configs say n_embed.
    hidden = _int_field(cfg, "hidden_size", "n_embd", "n_embed", "d_model")
    num_layers = _int_field(cfg, "num_hidden_layers", "n_layer", "num_layers")
    num_heads = _int_field(cfg, "num_attention_heads", "n_head", "num_heads")
    if model_type == "falcon":
        num_kv_heads = _falcon_kv_heads(cfg, num_heads)
    else:
        num_kv_heads = _int_field(cfg, "num_key_value_heads", "multi_query_group_num", required=False)
    if num_kv_heads is None:
        num_kv_heads = num_heads  # MHA: absent or null means one KV head per query head (as HF reads it)
    if num_heads % num_kv_heads:
        raise ArchitectureError(
            f"config field 'num_key_value_heads' ({num_kv_heads}) must divide "
            f"'num_attention_heads' ({num_heads})"
        )
    head_dim = _int_field(cfg, "head_dim", required=False)
    if head_dim is None:
        if hidden % num_heads:
            raise ArchitectureError(
                f"config has no 'head_dim' and 'hidden_size' ({hidden}) is not divisible by "
                f"'num_attention_heads' ({num_heads})"
            )
        head_dim = hidden // num_heads
    vocab = _int_field(cfg, "vocab_size")
    mla = _mla_fields(cfg, model_type)
    if mla:
        head_dim = mla["qk_head_dim"]  # DeepSeek's config 'head_dim' is the rope part only

    if model_type == "bloom":
        intermediate = 4 * hidden  # Bloom's MLP width is fixed by the architecture
        given = cfg.get("intermediate_size")
        if given is not None and int(given) != intermediate:
            raise ArchitectureError(f"bloom config field 'intermediate_size' ({given}) contradicts 4*hidden_size")
    elif model_type == "gpt2":
        # n_inner null (every published GPT-2) means 4 * n_embd, as HF's GPT2MLP reads it
        intermediate = _int_field(cfg, "n_inner", required=False) or 4 * hidden
    elif model_type == "falcon":
        intermediate = _int_field(cfg, "ffn_hidden_size", required=False) or 4 * hidden  # HF FalconConfig default
    elif model_type == "opt":
        intermediate = _int_field(cfg, "ffn_dim")
    else:
        intermediate = _int_field(cfg, *_INTERMEDIATE_FIELDS, required=False)

    # Mixture of experts.
    n_experts = _int_field(cfg, "num_local_experts", "num_experts", "n_routed_experts", required=False, minimum=0) or 0
    top_k = _int_field(cfg, "num_experts_per_tok", "experts_per_token", "moe_top_k", required=False, minimum=0) or 0
    moe_inter = 0
    shared_inter = 0
    dense_layers = 0
    shared_gate = False
    if model_type == "llama4_text" and n_experts:
        # Llama 4: intermediate_size is the expert (and shared expert) width, intermediate_size_mlp
        # the dense layers'; moe_layers (or interleave_moe_layer_step) says which layers are MoE.
        moe_inter = _int_field(cfg, "intermediate_size")
        shared_inter = moe_inter
        intermediate = _int_field(cfg, "intermediate_size_mlp", required=False) or moe_inter
        dense_layers = num_layers - _llama4_moe_layer_count(cfg, num_layers)
        if not top_k:
            raise ArchitectureError("MoE config (experts > 0) is missing 'num_experts_per_tok'")
    elif model_type == "deepseek_v3" and n_experts:
        moe_inter = _int_field(cfg, "moe_intermediate_size")
        shared_inter = moe_inter * (_int_field(cfg, "n_shared_experts", required=False, minimum=0) or 0)
        dense_layers = min(_int_field(cfg, "first_k_dense_replace", required=False, minimum=0) or 0, num_layers)
        if cfg.get("moe_layer_freq", 1) not in (1, None):
            raise ArchitectureError("deepseek_v3 config field 'moe_layer_freq' != 1 (MoE every k-th layer) is not "
                                    "supported")
        if not top_k:
            raise ArchitectureError("MoE config (experts > 0) is missing 'num_experts_per_tok'")
        if intermediate is None and dense_layers:
            raise ArchitectureError("deepseek_v3 config has dense layers but no 'intermediate_size'")
    elif n_experts:
        if not top_k:
            raise ArchitectureError("MoE config (experts > 0) is missing 'num_experts_per_tok'")
        if top_k > n_experts:
            raise ArchitectureError(
                f"config field 'num_experts_per_tok' ({top_k}) exceeds the number of experts ({n_experts})"
            )
        moe_inter = _int_field(cfg, "moe_intermediate_size", required=False) or intermediate
        if moe_inter is None:
            raise ArchitectureError("MoE config is missing 'moe_intermediate_size' and 'intermediate_size'")
        shared_inter = _int_field(cfg, "shared_expert_intermediate_size", required=False, minimum=0) or 0
        shared_gate = shared_inter > 0  # Qwen2-MoE's shared expert is scaled by a sigmoid gate
        if cfg.get("decoder_sparse_step", 1) not in (1, None) or cfg.get("mlp_only_layers"):
            raise ArchitectureError(
                "config fields 'decoder_sparse_step'/'mlp_only_layers' (mixed dense and MoE layers) are not supported"
            )
    elif top_k and model_type not in ("llama4_text", "deepseek_v3"):
        raise ArchitectureError("config sets 'num_experts_per_tok' but no number of experts")
    if n_experts and top_k > n_experts:
        raise ArchitectureError(
            f"config field 'num_experts_per_tok' ({top_k}) exceeds the number of experts ({n_experts})")
    if n_experts and dense_layers >= num_layers:
        n_experts = 0  # every layer dense (e.g. first_k_dense_replace >= num_hidden_layers)
        moe_inter = shared_inter = dense_layers = 0
    if not n_experts:
        top_k = 0  # dense Llama 4 / DeepSeek configs keep the MoE fields at their defaults
    if intermediate is None:
        if n_experts:
            intermediate = moe_inter
        else:
            raise ArchitectureError("config is missing required field "
                                    + " or ".join(repr(n) for n in _INTERMEDIATE_FIELDS))

    # Sliding-window attention: only where the family actually applies it.
    window = cfg.get("sliding_window")
    window_fraction = 0.0
    if window is not None:
        if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            window = None  # Qwen ships a sliding_window value but disables it
        else:
            window = _int_field(cfg, "sliding_window")
            layer_types = cfg.get("layer_types")
            if isinstance(layer_types, list) and layer_types:
                window_fraction = sum(t == "sliding_attention" for t in layer_types) / len(layer_types)
            elif model_type == "gemma2":
                # Gemma2 alternates, starting with a sliding layer (layer i slides iff i is even)
                window_fraction = math.ceil(num_layers / 2) / num_layers
            elif model_type == "gemma3_text":
                # Gemma3TextConfig: layer i is global iff (i + 1) % sliding_window_pattern == 0
                pattern = _int_field(cfg, "sliding_window_pattern")
                window_fraction = sum((i + 1) % pattern != 0 for i in range(num_layers)) / num_layers
            elif model_type == "gpt_oss":
                # GptOssConfig: even layers slide, odd layers attend fully
                window_fraction = math.ceil(num_layers / 2) / num_layers
            elif model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and cfg.get("max_window_layers") is not None:
                # Qwen slides only layers i >= max_window_layers
                first = min(max(int(cfg["max_window_layers"]), 0), num_layers)
                window_fraction = (num_layers - first) / num_layers
            else:
                window_fraction = 1.0
            if window_fraction == 0.0:
                window = None

    chunk, chunk_fraction = None, 0.0
    if model_type == "llama4_text" and cfg.get("attention_chunk_size") is not None:
        chunk = _int_field(cfg, "attention_chunk_size")
        layer_types = cfg.get("layer_types")
        if isinstance(layer_types, list) and layer_types:
            chunk_fraction = sum(t == "chunked_attention" for t in layer_types) / len(layer_types)
        else:
            # Llama4TextConfig: no_rope_layers[i] == 1 marks a RoPE layer, and RoPE layers are chunked;
            # by default every no_rope_layer_interval-th layer (1-based) is NoPE and attends fully
            flags = cfg.get("no_rope_layers")
            if not (isinstance(flags, list) and flags):
                interval = _int_field(cfg, "no_rope_layer_interval", required=False) or 4
                flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
            chunk_fraction = sum(bool(f) for f in flags) / len(flags)
        if chunk_fraction == 0.0:
            chunk = None

    activation = _activation(cfg) or default_act
    if model_type in ("gemma", "gemma2", "gemma3_text") and cfg.get("hidden_activation"):
        activation = cfg["hidden_activation"]

    # HF's defaults when the field is absent: GPT-NeoX is the only family here with an untied head.
    tie_default = model_type in ("bloom", "gemma", "gemma2", "gemma3_text", "gpt2", "opt", "falcon")
    tie = bool(cfg.get("tie_word_embeddings", tie_default))

    norms_per_layer = 4 if model_type in ("gemma2", "gemma3_text") else 2
    parallel = False
    positions = 0
    if model_type == "bloom":
        attention_bias, mlp_bias = "all", True
    elif model_type in _QKV_BIAS_FAMILIES:
        attention_bias, mlp_bias = "qkv", False
    elif model_type == "gpt_oss":
        # GptOssConfig defaults attention_bias to true (every released checkpoint has q/k/v/o biases)
        attention_bias, mlp_bias = ("all" if cfg.get("attention_bias", True) else "none"), False
    elif model_type == "gpt2":
        if cfg.get("add_cross_attention"):
            raise ArchitectureError("gpt2 config field 'add_cross_attention' is true (an encoder-decoder "
                                    "block); only decoder-only GPT-2 is modelled")
        attention_bias, mlp_bias = "all", True  # Conv1D c_attn/c_proj/c_fc all carry biases
        positions = _int_field(cfg, "n_positions", "max_position_embeddings")
    elif model_type == "opt":
        _opt_supported(cfg, hidden)
        bias = bool(cfg.get("enable_bias", True))
        attention_bias, mlp_bias = ("all" if bias else "none"), bias
        # OPTLearnedPositionalEmbedding keeps 2 extra rows (its position offset)
        positions = _int_field(cfg, "max_position_embeddings") + 2
    elif model_type == "gpt_neox":
        attention_bias = "all" if cfg.get("attention_bias", True) else "none"
        mlp_bias = True  # GPTNeoXMLP's dense_h_to_4h / dense_4h_to_h always have biases
        parallel = bool(cfg.get("use_parallel_residual", True))
    elif model_type == "falcon":
        bias = bool(cfg.get("bias", False))
        attention_bias, mlp_bias = ("all" if bias else "none"), bias
        parallel = bool(cfg.get("parallel_attn", True))
        if parallel:
            # Falcon-7B style blocks share one LayerNorm between attention and MLP; the new decoder
            # architecture (40B/180B) has ln_attn and ln_mlp unless num_ln_in_parallel_attn says 1.
            n_ln = cfg.get("num_ln_in_parallel_attn")
            if n_ln is None:
                n_ln = 2 if cfg.get("new_decoder_architecture") else 1
            if n_ln not in (1, 2):
                raise ArchitectureError(f"falcon config field 'num_ln_in_parallel_attn' must be 1 or 2, got {n_ln!r}")
            norms_per_layer = int(n_ln)
    else:
        attention_bias = "all" if cfg.get("attention_bias") else "none"
        mlp_bias = bool(cfg.get("mlp_bias", False))

    return ModelArch(
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        gated_mlp=gated,
        norm_type=norm_type,
        activation=str(activation),
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        norms_per_layer=norms_per_layer,
        embedding_norm=model_type == "bloom",
        moe_num_experts=n_experts,
        moe_experts_per_token=top_k,
        moe_intermediate_size=moe_inter,
        moe_shared_intermediate_size=shared_inter,
        sliding_window=window,
        sliding_window_layer_fraction=window_fraction,
        known_family=known,
        position_embeddings=positions,
        parallel_attn_mlp=parallel,
        moe_dense_layers=dense_layers if n_experts else 0,
        moe_shared_gate=shared_gate,
        moe_router_bias=model_type == "gpt_oss" and bool(n_experts),
        moe_expert_bias=model_type == "gpt_oss" and bool(n_experts),
        attention_sinks=model_type == "gpt_oss",
        attention_chunk=chunk,
        attention_chunk_layer_fraction=chunk_fraction,
        mla_q_lora_rank=mla.get("q_lora_rank", 0) if mla else 0,
        mla_kv_lora_rank=mla.get("kv_lora_rank", 0) if mla else 0,
        mla_rope_dim=mla.get("rope_dim", 0) if mla else 0,
        v_head_dim=mla.get("v_head_dim", 0) if mla else 0,
    )


def _mla_fields(cfg: Mapping[str, Any], model_type: str) -> dict[str, int]:
    """Multi-head latent attention sizes (DeepSeek-V3), or {} for ordinary attention."""
    if model_type != "deepseek_v3" and cfg.get("kv_lora_rank") is None:
        return {}
    kv_rank = _int_field(cfg, "kv_lora_rank")
    q_rank = _int_field(cfg, "q_lora_rank", required=False) or 0  # null: a plain q_proj (V2-Lite)
    nope = _int_field(cfg, "qk_nope_head_dim")
    rope = _int_field(cfg, "qk_rope_head_dim")
    v = _int_field(cfg, "v_head_dim")
    if cfg.get("attention_bias"):
        raise ArchitectureError("deepseek_v3 config field 'attention_bias' is true: MLA projections with "
                                "biases are not modelled")
    return {"kv_lora_rank": kv_rank, "q_lora_rank": q_rank, "rope_dim": rope, "v_head_dim": v,
            "qk_head_dim": nope + rope}


def _llama4_moe_layer_count(cfg: Mapping[str, Any], num_layers: int) -> int:
    """Layers with experts, as Llama4TextConfig reads them: ``moe_layers`` if given, else every
    ``interleave_moe_layer_step``-th layer (1-based: step 2 makes layers 1, 3, 5, ... MoE)."""
    layers = cfg.get("moe_layers")
    if isinstance(layers, list):
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise ArchitectureError(f"llama4 config field 'moe_layers' has layer indices outside the model: {bad}")
        return len(set(layers))
    step = _int_field(cfg, "interleave_moe_layer_step", required=False) or 1
    return len(range(step - 1, num_layers, step))


def _activation(cfg: Mapping[str, Any]) -> str | None:
    """The MLP activation under each family's field name (GPT-2/OPT ``activation_function``,
    Falcon ``activation``, most others ``hidden_act``)."""
    for name in ("hidden_act", "activation_function", "activation", "hidden_activation"):
        value = cfg.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def _falcon_kv_heads(cfg: Mapping[str, Any], num_heads: int) -> int:
    """KV heads as HF's FalconAttention reads them: ``num_kv_heads`` under the new decoder
    architecture (40B/180B), one shared head with ``multi_query`` (7B; the HF default), else MHA."""
    if cfg.get("new_decoder_architecture"):
        return _int_field(cfg, "num_kv_heads", required=False) or num_heads
    if cfg.get("multi_query", True):
        return 1
    return num_heads


def _opt_supported(cfg: Mapping[str, Any], hidden: int) -> None:
    """OPT variants whose extra layers the kernel graph has no node for are refused by name."""
    proj = cfg.get("word_embed_proj_dim")
    if proj is not None and proj != hidden:
        raise ArchitectureError(
            f"opt config field 'word_embed_proj_dim' ({proj}) differs from 'hidden_size' ({hidden}): the "
            "project_in/project_out layers (e.g. opt-350m) are not modelled")
    if cfg.get("do_layer_norm_before", True) is False:
        raise ArchitectureError("opt config field 'do_layer_norm_before' is false (post-LayerNorm without a "
                                "final norm, e.g. opt-350m): not modelled")
    if cfg.get("layer_norm_elementwise_affine", True) is False:
        raise ArchitectureError("opt config field 'layer_norm_elementwise_affine' is false (norms without "
                                "weights): not modelled")


def is_finite_positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0
