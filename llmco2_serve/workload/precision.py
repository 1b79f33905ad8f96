"""Numeric precision of weights, activations and the KV cache.

The kernel equations need three byte sizes (paper: D_W, D_A, D_KV) and the dtype whose peak
throughput bounds the matmuls (Roofline, Eq. 8). Weight-only quantization (int8/int4, AWQ, GPTQ)
stores small weights but computes in the activation dtype; fp8 (W8A8) computes in fp8.
MXFP4 (gpt-oss) stores 4-bit E2M1 values with one 8-bit E8M0 scale per 32-value block, 4.25 bits
per weight, and only in the MoE experts: vLLM's mxfp4 method quantizes FusedMoE layers and leaves
attention, router, embeddings and LM head in the checkpoint dtype (``quantized_scope="experts"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "fp8", "int8", "int4", "mxfp4")

# MXFP4 (OCP Microscaling spec v1.0): 32 E2M1 elements (4 bits) share one E8M0 scale (8 bits).
MXFP4_BLOCK = 32
_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5,
          "mxfp4": (4 * MXFP4_BLOCK + 8) / MXFP4_BLOCK / 8}
# Dtypes whose checkpoints quantize only the MoE experts' weights.
_EXPERTS_ONLY = {"mxfp4"}
_ALIASES = {
    "fp32": "float32", "float": "float32", "torch.float32": "float32",
    "fp16": "float16", "half": "float16", "torch.float16": "float16",
    "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "fp8_e4m3": "fp8", "fp8_e5m2": "fp8", "float8": "fp8", "float8_e4m3fn": "fp8",
    "w8a16": "int8", "w4a16": "int4", "awq": "int4", "gptq": "int4",
    "mx_fp4": "mxfp4", "mxfp4_e2m1": "mxfp4",
}


class PrecisionError(ValueError):
    pass


def normalize_dtype(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _BYTES:
        raise PrecisionError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return key


@dataclass(frozen=True)
class Precision:
    """Byte sizes per element (D_W, D_A, D_KV) and the compute dtype for peak throughput."""

    weight_dtype: str
    activation_dtype: str
    kv_dtype: str
    compute_dtype: str
    # Which linear weights ``weight_dtype`` applies to: "all" decoder linear layers, or only the
    # MoE "experts" (the others stay in the activation dtype).
    quantized_scope: str = "all"

    def __post_init__(self):
        if self.quantized_scope not in ("all", "experts"):
            raise PrecisionError(f"quantized_scope must be 'all' or 'experts', got {self.quantized_scope!r}")

    @property
    def weight_bytes(self) -> float:
        return _BYTES[self.weight_dtype]

    def linear_weight_bytes(self, kind: str) -> float:
        """D_W of one linear kernel kind of the graph (``expert_*`` kinds are the MoE experts)."""
        if self.quantized_scope == "experts" and not kind.startswith("expert_"):
            return self.activation_bytes
        return self.weight_bytes

    @property
    def activation_bytes(self) -> float:
        return _BYTES[self.activation_dtype]

    @property
    def kv_bytes(self) -> float:
        return _BYTES[self.kv_dtype]

    @property
    def label(self) -> str:
        if self.weight_dtype == self.activation_dtype:
            return self.weight_dtype
        scope = "" if self.quantized_scope == "all" else f"({self.quantized_scope})"
        return f"w:{self.weight_dtype}{scope}/a:{self.activation_dtype}"

    @classmethod
    def from_name(cls, dtype: str, *, kv_cache_dtype: str | None = None, base_dtype: str = "bfloat16") -> "Precision":
        """``dtype`` as the CLI takes it. int8/int4 are weight-only (activations in ``base_dtype``)."""
        d = normalize_dtype(dtype)
        base = normalize_dtype(base_dtype)
        if base not in ("float32", "float16", "bfloat16"):
            raise PrecisionError(f"base dtype must be a float type, got {base_dtype!r}")
        if d in ("float32", "float16", "bfloat16"):
            weight, act, compute = d, d, d
        elif d == "fp8":
            weight, act, compute = "fp8", base, "fp8"  # W8A8 fp8: fp8 matmuls, bf16 between kernels
        else:
            # weight-only: dequantised on the fly (MXFP4 too: vLLM's Hopper kernels compute in bf16)
            weight, act, compute = d, base, base
        kv = act if kv_cache_dtype in (None, "auto") else normalize_dtype(kv_cache_dtype)
        if kv in _EXPERTS_ONLY:
            raise PrecisionError(f"kv cache dtype {kv_cache_dtype!r} is a weight format, not a KV-cache dtype")
        return cls(weight, act, kv, compute, "experts" if d in _EXPERTS_ONLY else "all")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, override: str | None = None,
                       kv_cache_dtype: str | None = None) -> "Precision":
        """From ``torch_dtype``/``dtype`` and ``quantization_config`` (``override`` wins)."""
        base = config.get("torch_dtype") or config.get("dtype") or None
        if base is None and override is None:
            raise PrecisionError("config has no 'torch_dtype' and no dtype was given; pass --dtype")
        base = normalize_dtype(base) if base else "bfloat16"
        if base not in ("float32", "float16", "bfloat16"):
            base = "bfloat16"
        if override:
            return cls.from_name(override, kv_cache_dtype=kv_cache_dtype,
                                 base_dtype=base if normalize_dtype(override) not in ("float32", "float16", "bfloat16") else normalize_dtype(override))
        quant = config.get("quantization_config")
        if isinstance(quant, Mapping):
            return cls.from_name(quantization_dtype(quant), kv_cache_dtype=kv_cache_dtype, base_dtype=base)
        return cls.from_name(base, kv_cache_dtype=kv_cache_dtype, base_dtype=base)


def quantization_dtype(quant: Mapping[str, Any]) -> str:
    """Map an HF ``quantization_config`` (or vLLM's quantization name) to our dtype names."""
    method = str(quant.get("quant_method", "")).lower()
    if method == "mxfp4":  # gpt-oss checkpoints
        return "mxfp4"
    bits = quant.get("bits") or quant.get("w_bit") or quant.get("weight_bits")
    if method == "bitsandbytes":
        if quant.get("load_in_8bit"):
            return "int8"
        if quant.get("load_in_4bit"):
            return "int4"
    if method == "compressed-tensors" and not bits:
        groups = quant.get("config_groups") or {}
        for group in groups.values() if isinstance(groups, Mapping) else ():
            weights = (group or {}).get("weights") or {}
            if weights.get("type") == "float" and weights.get("num_bits") == 8:
                return "fp8"
            bits = bits or weights.get("num_bits")
    if method in ("fp8", "fbgemm_fp8", "compressed-tensors") and not bits:
        return "fp8"
    if bits in (4, "4"):
        return "int4"
    if bits in (8, "8"):
        return "int8"
    if method in ("awq", "gptq", "marlin", "awq_marlin", "gptq_marlin", "bitsandbytes"):
        return "int4"
    raise PrecisionError(f"unsupported quantization_config {dict(quant)!r}: cannot tell the weight bit width")
