"""vLLM's config objects -> llmco2's frozen :class:`~llmco2_serve.runtime.service.ModelInfo`."""

from __future__ import annotations

from typing import Any

from llmco2_serve.runtime.service import ModelInfo


def model_info(vllm_config: Any) -> ModelInfo:
    mc = vllm_config.model_config
    hf = getattr(mc, "hf_text_config", None) or mc.hf_config
    cfg = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    if "architectures" not in cfg and getattr(mc, "architectures", None):
        cfg["architectures"] = list(mc.architectures)
    dtype = str(mc.dtype).removeprefix("torch.") if getattr(mc, "dtype", None) is not None else None
    names = getattr(mc, "served_model_name", None)
    name = names[0] if isinstance(names, (list, tuple)) and names else (names or mc.model)
    pc = vllm_config.parallel_config
    cc = getattr(vllm_config, "cache_config", None)
    sc = getattr(vllm_config, "scheduler_config", None)
    return ModelInfo(
        hf_config=cfg,
        model_name=str(name),
        dtype=dtype,
        quantization=getattr(mc, "quantization", None),
        kv_cache_dtype=str(getattr(cc, "cache_dtype", "auto")) if cc is not None else None,
        tensor_parallel=int(pc.tensor_parallel_size),
        pipeline_parallel=int(pc.pipeline_parallel_size),
        max_model_len=getattr(mc, "max_model_len", None),
        max_num_seqs=getattr(sc, "max_num_seqs", None) if sc is not None else None,
        engine=f"vllm-{vllm_version()}",
    )


def vllm_version() -> str:
    """The installed vLLM's version, ``unknown`` when it cannot be read."""
    try:
        import vllm

        return str(vllm.__version__)
    except (ImportError, AttributeError):
        return "unknown"
