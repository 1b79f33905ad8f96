"""Precision: D_W, D_A, D_KV byte sizes and the compute dtype, from names and HF configs."""

from __future__ import annotations

import re

import pytest

from llmco2_serve.workload.precision import DTYPE_CHOICES, Precision, PrecisionError, normalize_dtype, quantization_dtype


@pytest.mark.parametrize(
    "name,expected",
    [("float32", 4.0), ("float16", 2.0), ("bfloat16", 2.0), ("fp8", 1.0), ("int8", 1.0), ("int4", 0.5),
     ("mxfp4", 4.25 / 8)],  # OCP MX v1.0: 32 4-bit E2M1 values share one 8-bit E8M0 scale
)
def test_byte_sizes_for_every_choice(name, expected):
    p = Precision.from_name(name)
    assert p.weight_bytes == expected
    assert set(DTYPE_CHOICES) == {"float32", "float16", "bfloat16", "fp8", "int8", "int4", "mxfp4"}


@pytest.mark.parametrize(
    "alias,canonical",
    [("fp16", "float16"), ("half", "float16"), ("torch.bfloat16", "bfloat16"), ("BF16", "bfloat16"),
     (" float ", "float32"), ("fp8_e4m3", "fp8"), ("fp8_e5m2", "fp8"), ("float8_e4m3fn", "fp8"),
     ("w4a16", "int4"), ("w8a16", "int8"), ("awq", "int4"), ("gptq", "int4")],
)
def test_aliases(alias, canonical):
    assert normalize_dtype(alias) == canonical


@pytest.mark.parametrize("bad", ["float64", "int2", "", "nf4x"])
def test_unknown_dtype_raises_naming_it(bad):
    with pytest.raises(PrecisionError, match="unknown dtype " + re.escape(repr(bad))):
        normalize_dtype(bad)
    with pytest.raises(PrecisionError):
        Precision.from_name(bad)


def test_float_dtypes_are_uniform():
    p = Precision.from_name("float16")
    assert (p.weight_dtype, p.activation_dtype, p.kv_dtype, p.compute_dtype) == ("float16",) * 4
    assert (p.weight_bytes, p.activation_bytes, p.kv_bytes) == (2.0, 2.0, 2.0)
    assert p.label == "float16"


@pytest.mark.parametrize("dtype,w_bytes", [("int8", 1.0), ("int4", 0.5)])
def test_weight_only_quantization_keeps_activation_dtype(dtype, w_bytes):
    p = Precision.from_name(dtype, base_dtype="float16")
    assert p.weight_dtype == dtype and p.weight_bytes == w_bytes
    assert p.activation_dtype == "float16" and p.activation_bytes == 2.0
    assert p.kv_dtype == "float16" and p.kv_bytes == 2.0
    # dequantised on the fly: the matmuls run at the fp16 peak, not an integer one
    assert p.compute_dtype == "float16"
    assert p.label == f"w:{dtype}/a:float16"


def test_fp8_is_w8a8_compute_in_fp8():
    p = Precision.from_name("fp8")  # base bf16 by default
    assert (p.weight_dtype, p.activation_dtype, p.kv_dtype, p.compute_dtype) == ("fp8", "bfloat16", "bfloat16", "fp8")
    assert (p.weight_bytes, p.activation_bytes) == (1.0, 2.0)


def test_kv_cache_dtype_separate():
    p = Precision.from_name("bfloat16", kv_cache_dtype="fp8_e5m2")
    assert p.kv_dtype == "fp8" and p.kv_bytes == 1.0 and p.activation_bytes == 2.0
    assert Precision.from_name("bfloat16", kv_cache_dtype="auto").kv_dtype == "bfloat16"


def test_base_dtype_must_be_float():
    with pytest.raises(PrecisionError, match="base dtype"):
        Precision.from_name("int8", base_dtype="int4")


def test_precision_is_frozen():
    p = Precision.from_name("bfloat16")
    with pytest.raises(AttributeError):
        p.weight_dtype = "float32"  # type: ignore[misc]


# --- quantization_config mapping -------------------------------------------------------------


@pytest.mark.parametrize(
    "quant,expected",
    [
        # AutoAWQ checkpoints (e.g. TheBloke/...-AWQ, Qwen2-7B-Instruct-AWQ)
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}, "int4"),
        # older AutoAWQ spelling
        ({"quant_method": "awq", "w_bit": 4, "q_group_size": 128}, "int4"),
        # GPTQ int4 and int8 (Qwen2-7B-Instruct-GPTQ-Int4 / -Int8)
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, "int4"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False, "sym": True}, "int8"),
        ({"quant_method": "gptq", "bits": "8"}, "int8"),
        # fp8 checkpoints (e.g. neuralmagic/...-FP8 via quant_method fp8)
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8"),
        ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}, "fp8"),
        ({"quant_method": "awq"}, "int4"),  # AWQ without bits: AWQ is 4-bit
    ],
)
def test_quantization_dtype_mapping(quant, expected):
    assert quantization_dtype(quant) == expected


def test_quantization_without_bit_width_raises():
    with pytest.raises(PrecisionError, match="bit width"):
        quantization_dtype({"quant_method": "mystery"})


def test_compressed_tensors_w4a16_is_int4():
    quant = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
            "input_activations": None,
        }},
    }
    assert quantization_dtype(quant) == "int4"


def test_bitsandbytes_8bit_is_int8():
    assert quantization_dtype({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}) == "int8"


# --- from_hf_config --------------------------------------------------------------------------


def test_from_hf_config_plain_dtype():
    p = Precision.from_hf_config({"torch_dtype": "bfloat16"})
    assert (p.weight_bytes, p.activation_bytes, p.kv_bytes, p.compute_dtype) == (2.0, 2.0, 2.0, "bfloat16")
    # transformers 5 writes "dtype" instead of "torch_dtype"
    assert Precision.from_hf_config({"dtype": "float32"}).weight_bytes == 4.0


def test_from_hf_config_awq_keeps_checkpoint_dtype_for_activations():
    cfg = {"torch_dtype": "float16", "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    p = Precision.from_hf_config(cfg)
    assert (p.weight_dtype, p.activation_dtype, p.kv_dtype, p.compute_dtype) == ("int4", "float16", "float16", "float16")


def test_from_hf_config_fp8_checkpoint():
    cfg = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    p = Precision.from_hf_config(cfg, kv_cache_dtype="fp8")
    assert (p.weight_dtype, p.activation_dtype, p.kv_dtype, p.compute_dtype) == ("fp8", "bfloat16", "fp8", "fp8")


def test_from_hf_config_override_wins():
    cfg = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    p = Precision.from_hf_config(cfg, override="float16")
    assert (p.weight_dtype, p.activation_dtype, p.compute_dtype) == ("float16", "float16", "float16")
    q = Precision.from_hf_config({"torch_dtype": "float16"}, override="int8")
    assert (q.weight_dtype, q.activation_dtype) == ("int8", "float16")


def test_from_hf_config_missing_dtype_names_the_field():
    with pytest.raises(PrecisionError, match="torch_dtype"):
        Precision.from_hf_config({"model_type": "llama"})
    # with an explicit dtype a config without one is fine
    assert Precision.from_hf_config({}, override="bfloat16").weight_bytes == 2.0


def test_from_hf_config_unknown_torch_dtype_raises():
    with pytest.raises(PrecisionError, match="float64"):
        Precision.from_hf_config({"torch_dtype": "float64"})


# --- MXFP4 (gpt-oss) and block-fp8 (DeepSeek-V3) checkpoints ---------------------------------


def test_mxfp4_checkpoint_quantizes_only_the_experts():
    cfg = {"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"]}}
    p = Precision.from_hf_config(cfg)
    assert (p.weight_dtype, p.activation_dtype, p.kv_dtype, p.compute_dtype) == ("mxfp4", "bfloat16", "bfloat16",
                                                                                "bfloat16")
    assert p.quantized_scope == "experts"
    assert p.linear_weight_bytes("expert_gate_proj") == 4.25 / 8
    for kind in ("q_proj", "o_proj", "router", "gate_proj"):
        assert p.linear_weight_bytes(kind) == 2.0
    assert p.label == "w:mxfp4(experts)/a:bfloat16"


def test_mxfp4_expert_bytes_equal_the_packed_tensors_transformers_loads():
    """transformers' Mxfp4GptOssExperts holds each expert matrix as uint8 blocks of 16 bytes (32
    E2M1 values); the checkpoint stores one uint8 E8M0 scale per block beside them."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    from llmco2_serve.workload.arch import ModelArch
    from llmco2_serve.workload.graph import build_layer_template
    from llmco2_serve.hardware.gpus import gpu_spec

    cfg = transformers.GptOssConfig(hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_local_experts=4,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)
    with torch.device("meta"):
        experts = mx.Mxfp4GptOssExperts(cfg)
    blocks = experts.gate_up_proj.numel() + experts.down_proj.numel()  # bytes (uint8)
    scales = blocks // 16
    arch = ModelArch.from_hf_config(dict(cfg.to_dict(), model_type="gpt_oss"))
    tpl = build_layer_template(arch, Precision.from_name("mxfp4"), gpu_spec("H100"))
    bf16 = build_layer_template(arch, Precision.from_name("bfloat16"), gpu_spec("H100"))
    expert_matrices = arch.num_layers * arch.moe_num_experts * 3 * arch.hidden_size * arch.moe_intermediate_size
    # only the expert matrices change size: every other weight stays bf16
    assert bf16.weight_bytes() - tpl.weight_bytes() == expert_matrices * 2 - arch.num_layers * (blocks + scales)


@pytest.mark.parametrize("quant", [
    {"quant_method": "mxfp4"}, {"quant_method": "MXFP4", "modules_to_not_convert": None},
])
def test_mxfp4_quantization_mapping(quant):
    assert quantization_dtype(quant) == "mxfp4"
    assert normalize_dtype("mx_fp4") == "mxfp4"


def test_deepseek_block_fp8_checkpoint_is_fp8_everywhere():
    cfg = {"torch_dtype": "bfloat16", "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}}
    p = Precision.from_hf_config(cfg)
    assert (p.weight_dtype, p.compute_dtype, p.quantized_scope) == ("fp8", "fp8", "all")
    assert p.linear_weight_bytes("q_proj") == p.linear_weight_bytes("expert_up_proj") == 1.0


def test_quantized_scope_is_validated():
    with pytest.raises(PrecisionError, match="quantized_scope"):
        Precision("int4", "bfloat16", "bfloat16", "bfloat16", "attention")


def test_mxfp4_is_not_a_kv_cache_dtype():
    with pytest.raises(PrecisionError, match="not a KV-cache dtype"):
        Precision.from_name("bfloat16", kv_cache_dtype="mxfp4")
