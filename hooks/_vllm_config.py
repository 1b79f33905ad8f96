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
        data_parallel=_positive(getattr(pc, "data_parallel_size", 1)),
        engines_per_api_server=engines_per_api_server(pc),
        api_servers=_positive(getattr(pc, "_api_process_count", 1)),
    )


def engines_per_api_server(pc: Any) -> int:
    """How many data-parallel engines one API server sends requests to (vLLM's load-balancing modes):
    all of them by default (internal LB), this node's with ``--data-parallel-hybrid-lb``, its own
    one with an external load balancer (``--data-parallel-external-lb`` / ``--data-parallel-rank``)."""
    if getattr(pc, "data_parallel_external_lb", False):
        return 1
    if getattr(pc, "data_parallel_hybrid_lb", False):
        return _positive(getattr(pc, "data_parallel_size_local", 1))
    return _positive(getattr(pc, "data_parallel_size", 1))


def _positive(value: Any) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return 1


def vllm_version() -> str:
    """The installed vLLM's version, ``unknown`` when it cannot be read."""
    try:
        import vllm

        return str(vllm.__version__)
    except (ImportError, AttributeError):
        return "unknown"
