"""The carbon priority reaches vLLM's own scheduler and changes its order (--scheduling-policy priority).

No server: the API-server hook (hooks/admission.on_request) decides on real EngineCoreRequests with a
real EnergyService, the engine core's Request is made from them as vLLM does, and vLLM 0.32's
``vllm.v1.core.sched.scheduler.Scheduler`` (tiny config, one sequence per step) picks which runs first.
The truth is vLLM's scheduler itself: FCFS runs the earlier, costlier request first; the priority
policy runs the cheaper one first; nothing else differs between the two runs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm


def _scheduler(model_dir: str, policy: str):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=model_dir, dtype="float32", seed=0, skip_tokenizer_init=True, max_model_len=512)
    sched = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512, max_model_len=512, is_encoder_decoder=False,
                            policy=policy, enable_chunked_prefill=True)
    cache = CacheConfig(block_size=16, enable_prefix_caching=False)  # no block hasher needed
    cache.num_gpu_blocks = 64
    cfg = VllmConfig(model_config=model_config, scheduler_config=sched, cache_config=cache)
    kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8,
                                                      dtype=torch.float32))])
    return Scheduler(vllm_config=cfg, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(cfg),
                     block_size=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from llmco2_serve.devtools.tinymodel import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


def test_carbon_priority_reorders_vllms_priority_scheduler_and_fcfs_ignores_it(model_dir, tmp_path):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.request import Request

    from llmco2_serve.devtools.tinymodel import tiny_config
    from llmco2_serve.hooks import _state
    from llmco2_serve.hooks import admission as hook
    from llmco2_serve.runtime.service import EnergyService, ModelInfo
    from llmco2_serve.runtime.settings import load_settings

    model = ModelInfo(hf_config={**tiny_config("llama"), "torch_dtype": "float32"}, model_name="tiny",
                      dtype="float32", max_model_len=512, max_num_seqs=8)
    base = load_settings({"LLMCO2_PAIRS_PATH": "", "LLMCO2_GPU": "H100", "LLMCO2_PROMETHEUS": "0"})
    svc = EnergyService(base, model, gpu_names=[], prediction_table="off")
    # The two requests' predicted carbon, to put the priority threshold between them.
    big = svc.predict("probe-big", 400, 100, 0, 1).co2_g
    small = svc.predict("probe-small", 10, 4, 0, 1).co2_g
    assert small < big
    conf = tmp_path / "admission.toml"
    conf.write_text('reload_interval_s = 0\n[priority]\nby = "carbon"\nco2_g_thresholds = [%r]\n'
                    % ((small * big) ** 0.5))
    settings = load_settings({"LLMCO2_PAIRS_PATH": "", "LLMCO2_GPU": "H100", "LLMCO2_PROMETHEUS": "0",
                              "LLMCO2_ADMISSION_CONFIG": str(conf)})
    st = _state.state()
    saved = (st.active, st.settings, st.extra.get("admission"))
    st.active, st.settings = True, settings
    st.extra["admission"] = hook._Admission(settings)
    try:
        def engine_request(rid: str, prompt_len: int, max_tokens: int, arrival: float) -> EngineCoreRequest:
            r = EngineCoreRequest(request_id=rid, prompt_token_ids=list(range(3, 3 + prompt_len)), mm_features=None,
                                  sampling_params=SamplingParams(max_tokens=max_tokens), pooling_params=None,
                                  arrival_time=arrival, lora_request=None, cache_salt=None, data_parallel_rank=None)
            hook.on_request(svc, r, prompt_len, 0, 1)  # the patched OutputProcessor.add_request's decision
            return r

        costly = engine_request("costly", 400, 100, 1000.0)  # arrives first
        cheap = engine_request("cheap", 10, 4, 1001.0)
        assert (costly.priority, cheap.priority) == (1, 0)  # lower runs first in vLLM

        first = {}
        for policy in ("fcfs", "priority"):
            sched = _scheduler(model_dir, policy)
            for r in (costly, cheap):
                sched.add_request(Request.from_engine_core_request(r, block_hasher=None))
            out = sched.schedule()
            scheduled = [n.req_id for n in out.scheduled_new_reqs]
            assert len(scheduled) == 1  # one sequence per step: the order is the scheduler's choice
            first[policy] = scheduled[0]
        assert first == {"fcfs": "costly", "priority": "cheap"}
    finally:
        adm = st.extra.get("admission")
        if adm is not None:
            adm.close()
        st.active, st.settings = saved[0], saved[1]
        if saved[2] is None:
            st.extra.pop("admission", None)
        else:
            st.extra["admission"] = saved[2]
        svc.close()
