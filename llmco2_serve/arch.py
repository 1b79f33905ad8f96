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
        from .graph import weight_params_per_layer  # local import: graph imports arch

        h = self.hidden_size
        norm_params = h * (2 if self.norm_type == "layernorm" else 1)
        embed = self.vocab_size * h
        total = embed + self.num_layers * weight_params_per_layer(self) + norm_params
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
        return dict(config["text_config"])
    return config


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
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureError("config is missing required field 'model_type'")
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
    top_k = _int_field(cfg, "num_experts_per_tok", "moe_top_k", required=False, minimum=0) or 0
    moe_inter = 0
    shared_inter = 0
    if n_experts:
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
        if cfg.get("decoder_sparse_step", 1) not in (1, None) or cfg.get("mlp_only_layers"):
            raise ArchitectureError(
                "config fields 'decoder_sparse_step'/'mlp_only_layers' (mixed dense and MoE layers) are not supported"
            )
    elif top_k:
        raise ArchitectureError("config sets 'num_experts_per_tok' but no number of experts")
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
            elif model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and cfg.get("max_window_layers") is not None:
                # Qwen slides only layers i >= max_window_layers
                first = min(max(int(cfg["max_window_layers"]), 0), num_layers)
                window_fraction = (num_layers - first) / num_layers
            else:
                window_fraction = 1.0
            if window_fraction == 0.0:
                window = None

    activation = _activation(cfg) or default_act
    if model_type in ("gemma", "gemma2") and cfg.get("hidden_activation"):
        activation = cfg["hidden_activation"]

    # HF's defaults when the field is absent: GPT-NeoX is the only family here with an untied head.
    tie_default = model_type in ("bloom", "gemma", "gemma2", "gpt2", "opt", "falcon")
    tie = bool(cfg.get("tie_word_embeddings", tie_default))

    norms_per_layer = 4 if model_type == "gemma2" else 2
    parallel = False
    positions = 0
    if model_type == "bloom":
        attention_bias, mlp_bias = "all", True
    elif model_type in _QKV_BIAS_FAMILIES:
        attention_bias, mlp_bias = "qkv", False
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
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
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
    )


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
