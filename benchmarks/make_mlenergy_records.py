"""Convert the ML.ENERGY Benchmark v3 vLLM runs into energy records (llmco2_serve/data/mlenergy-v3-vllm.jsonl).

Run: ``python benchmarks/make_mlenergy_records.py [--src DIR] [--out PATH]``.

Source: ``shared/data/mlenergy-v3/models/<org>__<model>__<task>.json`` (ML.ENERGY Leaderboard data,
Apache-2.0; Chung et al., "The ML.ENERGY Benchmark", NeurIPS Datasets and Benchmarks 2025). Each
file holds, per GPU configuration, one *steady-state* measurement of vLLM serving with continuous
batching: ``energy_per_request_joules`` (all GPUs, per completed request), ``avg_batch_size``
(average running batch), ``avg_output_len`` and ``output_throughput_tokens_per_sec``. One record per
configuration, every configuration kept, in file order.

What a record says and how (written into every row under ``provenance``):

* It is an **aggregated steady-state** record (``"aggregated": "steady-state"``): a batch of
  ``batch = round(avg_batch_size)`` sequences of ``gen_tokens = round(avg_output_len)`` output
  tokens each; ``request_energy_j = energy_per_request_joules x batch`` (the batch's energy, the
  records format's convention), so energy per sequence is the source value exactly.
  ``request_time_s = batch x gen_tokens / output_throughput_tokens_per_sec`` (a request's
  residence time at that throughput).
* **No phase split**: ``prefill_energy_j`` / ``decode_energy_j`` are absent (the source has none).
* **Prompt length is not in the source.** ``prompt_len`` is a per-task *assumption*
  (:data:`ASSUMED_PROMPT_LEN`, ``"prompt_len_assumed": true`` in every row): round numbers for a
  chat turn, a GPQA question with its choices and instructions, and a code fill-in-the-middle
  context. Over outputs of hundreds to thousands of tokens per sequence the prefill is a small
  share of the energy, but it is not measured: treat it as such.
* ``arch``: the architecture fields of the model's published Hugging Face ``config.json``
  (:data:`CONFIGS`, transcribed by hand; no network here), plus ``n_params`` from the source's
  ``total_params_billions`` and ``attn_impl: "vllm"`` (fused attention). Where the parser models the
  family today, the converter checks that the parameter count implied by those fields is within
  15 % of the source's ``total_params_billions`` (a transcription error fails the conversion).
  Nemotron-H (hybrid Mamba) carries only its ``model_type``: the parser refuses it.
* Parallelism: ``n_gpu = num_gpus``; the graph models it as tensor parallel. The source's
  tensor/expert/data-parallel degrees are kept in ``provenance`` (MoE runs used expert parallel).
* GPU names: ``H100`` -> ``NVIDIA H100 80GB HBM3`` (SXM), ``B200`` -> ``NVIDIA B200``.

Rows whose architecture or dtype the parser does not support yet are written anyway; training and
evaluation count and skip them with a per-model message (``llmco2_serve.predictors.dataset``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "mlenergy-v3"
DEFAULT_OUT = REPO / "llmco2_serve" / "data" / "mlenergy-v3-vllm.jsonl"

ENGINE = "vllm-continuous-batching (ML.ENERGY v3)"
GPU_NAMES = {"H100": "NVIDIA H100 80GB HBM3", "B200": "NVIDIA B200"}
# Assumptions, not data: the source does not publish prompt lengths (its README).
ASSUMED_PROMPT_LEN = {"lm-arena-chat": 256, "gpqa": 512, "sourcegraph-fim": 2048}
FIELDS_USED = ("energy_per_request_joules", "avg_batch_size", "avg_output_len", "output_throughput_tokens_per_sec",
               "gpu_model", "num_gpus", "max_num_seqs", "parallelization", "weight_precision",
               "total_params_billions")

_QWEN3 = {"model_type": "qwen3", "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
          "hidden_act": "silu", "rms_norm_eps": 1e-6}
_QWEN3_MOE = {**_QWEN3, "model_type": "qwen3_moe", "decoder_sparse_step": 1, "mlp_only_layers": [],
              "norm_topk_prob": True}
_QWEN3_30B_A3B = {**_QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                  "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "num_experts": 128, "num_experts_per_tok": 8}
_QWEN3_235B = {**_QWEN3_MOE, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
               "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4,
               "num_experts": 128, "num_experts_per_tok": 8}
_QWEN3_480B = {**_QWEN3_MOE, "hidden_size": 6144, "intermediate_size": 8192, "moe_intermediate_size": 2560,
               "num_hidden_layers": 62, "num_attention_heads": 96, "num_key_value_heads": 8,
               "num_experts": 160, "num_experts_per_tok": 8}
_DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8,
                "topk_group": 4, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280, "tie_word_embeddings": False,
                "hidden_act": "silu", "rms_norm_eps": 1e-6,
                "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
_GEMMA3_TEXT = {"model_type": "gemma3_text", "vocab_size": 262208, "sliding_window": 1024,
                "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6}
_LLAMA4_TEXT = {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
                "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
                "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 202048, "num_experts_per_tok": 1,
                "attention_chunk_size": 8192, "hidden_act": "silu", "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False}
_GPT_OSS = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_attention_heads": 64,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "num_experts_per_tok": 4,
            "experts_per_token": 4, "sliding_window": 128, "tie_word_embeddings": False, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "quantization_config": {"quant_method": "mxfp4"}}


def _gpt_oss(layers: int, experts: int) -> dict:
    return {**_GPT_OSS, "num_hidden_layers": layers, "num_local_experts": experts,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)}


# model id -> HF config.json architecture fields (published configs, transcribed).
CONFIGS: dict[str, dict] = {
    "Qwen/Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "num_key_value_heads": 8},
    "Qwen/Qwen3-14B": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
                       "num_attention_heads": 40, "num_key_value_heads": 8},
    "Qwen/Qwen3-32B": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
                       "num_attention_heads": 64, "num_key_value_heads": 8},
    "Qwen/Qwen3-30B-A3B-Instruct-2507": _QWEN3_30B_A3B,
    "Qwen/Qwen3-30B-A3B-Thinking-2507": _QWEN3_30B_A3B,
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": _QWEN3_30B_A3B,
    "Qwen/Qwen3-235B-A22B-Instruct-2507": _QWEN3_235B,
    "Qwen/Qwen3-235B-A22B-Thinking-2507": _QWEN3_235B,
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8": _QWEN3_235B,
    "Qwen/Qwen3-235B-A22B-Thinking-2507-FP8": _QWEN3_235B,
    "Qwen/Qwen3-Coder-480B-A35B-Instruct": _QWEN3_480B,
    "Qwen/Qwen3-Coder-480B-A35B-Instruct-FP8": _QWEN3_480B,
    "deepseek-ai/DeepSeek-V3.1": _DEEPSEEK_V3,
    "deepseek-ai/DeepSeek-R1-0528": _DEEPSEEK_V3,
    "google/gemma-3-12b-it": {"model_type": "gemma3", "text_config": {
        **_GEMMA3_TEXT, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256}},
    "google/gemma-3-27b-it": {"model_type": "gemma3", "text_config": {
        **_GEMMA3_TEXT, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168}},
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": {"model_type": "llama4", "text_config": {
        **_LLAMA4_TEXT, "num_local_experts": 16, "interleave_moe_layer_step": 1}},
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8": {"model_type": "llama4", "text_config": {
        **_LLAMA4_TEXT, "num_local_experts": 128, "interleave_moe_layer_step": 2}},
    "openai/gpt-oss-20b": _gpt_oss(24, 32),
    "openai/gpt-oss-120b": _gpt_oss(36, 128),
    # Hybrid Mamba-Transformer: refused by the parser; only the type is recorded.
    "nvidia/NVIDIA-Nemotron-Nano-9B-v2": {"model_type": "nemotron_h"},
    "nvidia/NVIDIA-Nemotron-Nano-12B-v2": {"model_type": "nemotron_h"},
}


class ConversionError(ValueError):
    pass


def _label(model_id: str) -> str:
    return model_id.split("/", 1)[1]


def _family(model_id: str) -> str:
    """The leave-one-family-out group: the config's model_type (the text part's for VLM wrappers)."""
    return CONFIGS[model_id]["model_type"]


def _check_params(model_id: str, arch: dict, total_b: float) -> str:
    """Where the parser models the family, the implied parameter count must match the source's."""
    import logging

    from llmco2_serve.workload.arch import ArchitectureError, ModelArch

    logging.getLogger("llmco2_serve.workload.arch").setLevel(logging.ERROR)
    try:
        parsed = ModelArch.from_hf_config(arch)
    except ArchitectureError as e:
        return f"not checked ({e})"
    if not parsed.known_family:
        return "not checked (family not modelled by the parser yet)"
    implied = parsed.param_count()
    ratio = implied / (total_b * 1e9)
    if not 0.85 <= ratio <= 1.15:
        raise ConversionError(f"{model_id}: the transcribed config implies {implied / 1e9:.2f} B parameters, "
                              f"the source says {total_b} B: fix CONFIGS")
    return f"implied {implied / 1e9:.2f} B vs source {total_b} B"


def convert_file(path: Path, src_root: Path) -> list[dict]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    model_id, task = doc["model_id"], doc["task"]
    if model_id not in CONFIGS:
        raise ConversionError(f"{path.name}: no config for {model_id!r}: add it to CONFIGS")
    if task not in ASSUMED_PROMPT_LEN:
        raise ConversionError(f"{path.name}: no assumed prompt length for task {task!r}")
    arch = {**CONFIGS[model_id], "n_params": int(round(doc["total_params_billions"] * 1e9)), "attn_impl": "vllm"}
    # Printed, not stored: the rows must not depend on which families the parser models today.
    print(f"  {model_id}: params {_check_params(model_id, arch, doc['total_params_billions'])}", file=sys.stderr)
    rel = str(path.relative_to(src_root))
    rows = []
    for i, c in enumerate(doc["configurations"]):
        if c["gpu_model"] not in GPU_NAMES:
            raise ConversionError(f"{rel} configuration {i}: unknown gpu_model {c['gpu_model']!r}")
        batch = max(1, int(round(c["avg_batch_size"])))
        gen = max(1, int(round(c["avg_output_len"])))
        par = c["parallelization"]
        rows.append({
            "model": _label(model_id), "family": _family(model_id), "arch": arch,
            "dtype": doc["weight_precision"], "gpu": GPU_NAMES[c["gpu_model"]], "n_gpu": int(c["num_gpus"]),
            "batch": batch, "prompt_len": ASSUMED_PROMPT_LEN[task], "gen_tokens": gen,
            "request_energy_j": c["energy_per_request_joules"] * batch,
            "request_time_s": batch * gen / c["output_throughput_tokens_per_sec"],
            "engine": ENGINE, "aggregated": "steady-state", "prompt_len_assumed": True,
            "source": f"mlenergy-v3:{rel}#{i}",
            "provenance": {
                "dataset": "ML.ENERGY Benchmark v3 (ml-energy/leaderboard public/data @0cd52dab, 2026-02-16)",
                "file": rel, "configuration": i, "model_id": model_id, "task": task,
                "fields_used": list(FIELDS_USED),
                "energy_per_request_joules": c["energy_per_request_joules"],
                "avg_batch_size": c["avg_batch_size"], "avg_output_len": c["avg_output_len"],
                "max_num_seqs": c["max_num_seqs"], "tensor_parallel": par["tensor_parallel"],
                "expert_parallel": par["expert_parallel"], "data_parallel": par["data_parallel"],
                "batch": "round(avg_batch_size); request_energy_j = energy_per_request_joules x batch",
                "gen_tokens": "round(avg_output_len)",
                "prompt_len": f"assumed for task {task!r}: not in the source",
                "phases": "not in the source: prefill/decode absent",
                "arch": "published HF config.json fields, transcribed",
            },
        })
    return rows


def convert(src: Path) -> list[dict]:
    files = sorted((src / "models").glob("*.json"))
    if not files:
        raise ConversionError(f"{src}/models: no *.json files")
    rows = []
    for f in files:
        rows.extend(convert_file(f, src))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    rows = convert(args.src)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    args.out.write_text(text, encoding="utf-8")
    by_model: dict[str, int] = {}
    for r in rows:
        by_model[r["model"]] = by_model.get(r["model"], 0) + 1
    print(f"wrote {args.out}: {len(rows)} records, {len(by_model)} models, {len(text) / 1e6:.2f} MB, "
          f"sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    for m, n in by_model.items():
        print(f"  {m}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
