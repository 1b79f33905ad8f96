"""The add_request / abort_requests / merge_async_iterators patches on vLLM's real OutputProcessor.

Requests are added the way vLLM's AsyncLLM adds them (``ParentRequest`` fan-out for ``n > 1``,
one ``add_request`` per prompt of a multi-prompt completion) and aborted through vLLM's own
``OutputProcessor.abort_requests``; predictions come from the real predictor and are checked
against ``Predictor.predict_many`` for the batch the siblings form.
"""

from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest

pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.engine import EngineCoreRequest  # noqa: E402
from vllm.v1.engine.output_processor import OutputProcessor  # noqa: E402
from vllm.v1.engine.parallel_sampling import ParentRequest  # noqa: E402

from llmco2_serve.hooks import _patches, _state, api_server, http_headers  # noqa: E402
from llmco2_serve.workload.output_length import OutputLengthModel, OutputPrior  # noqa: E402
from llmco2_serve.runtime.service import EnergyService, ModelInfo, make_predictor  # noqa: E402
from llmco2_serve.runtime.settings import load_settings  # noqa: E402
from llmco2_serve.devtools.tinymodel import tiny_config  # noqa: E402

pytestmark = pytest.mark.vllm

MODEL = ModelInfo(hf_config={**tiny_config("llama"), "torch_dtype": "float32"}, model_name="tiny",
                  dtype="float32", max_model_len=512, max_num_seqs=64)
EXPECTED_TOKENS = 12  # the output-length prior below, below every max_tokens used


@pytest.fixture(scope="module")
def predictor():
    return make_predictor(load_settings({}), MODEL, []).predictor


@pytest.fixture()
def svc(predictor):
    _patches.unapply_all()
    _state._STATE = None
    st = _state.state()
    st.active = True
    st.service = EnergyService(load_settings({"LLMCO2_PAIRS_PATH": ""}), MODEL, gpu_names=[],
                               predictor_factory=lambda *a, **k: predictor, prediction_table="off",
                               output_lengths=OutputLengthModel(OutputPrior(float(EXPECTED_TOKENS), 12.0, "test")))
    for name, make in (("output_processor.add_request", api_server._wrap_add_request),
                       ("output_processor.abort_requests", api_server._wrap_abort_requests),
                       ("completion.merge_async_iterators", http_headers._wrap_merge_async_iterators)):
        assert _patches.apply(name, make)
    yield st.service
    _patches.unapply_all()
    _state._STATE = None


def request(rid, prompt_len=24, max_tokens=16, n=1):
    return EngineCoreRequest(
        request_id=rid, prompt_token_ids=list(range(3, 3 + prompt_len)), mm_features=None,
        sampling_params=SamplingParams(n=n, max_tokens=max_tokens), pooling_params=None,
        arrival_time=time.time(), lora_request=None, cache_salt=None, data_parallel_rank=None,
        external_req_id=rid)


def add_parallel(processor, parent_request):
    """AsyncLLM.add_request's fan-out for n > 1 (vllm/v1/engine/async_llm.py, 0.32)."""
    parent = ParentRequest(parent_request)
    children = []
    for idx in range(parent.n):
        child_id, child_params = parent.get_child_info(idx)
        child = parent_request if idx == parent.n - 1 else copy.copy(parent_request)
        child.request_id = child_id
        child.sampling_params = child_params
        children.append(child)
    for idx, child in enumerate(children):
        processor.add_request(child, None, parent, idx, None)
    return parent, [c.request_id for c in children]


def test_n_children_are_one_batch_split_evenly(svc, predictor):
    processor = OutputProcessor(None, log_stats=False)
    for i in range(2):  # two unrelated requests already in flight
        processor.add_request(request(f"other{i}"), None)
    parent, ids = add_parallel(processor, request("cmpl-x", n=3))
    preds = [svc.prediction(i) for i in ids]
    assert [p.batch for p in preds] == [5, 5, 5]  # 2 in flight + 3 siblings, whatever their order
    assert preds[0].energy_j == preds[1].energy_j == preds[2].energy_j
    batch_of_5 = predictor.predict_many(np.array([24]), np.array([EXPECTED_TOKENS]), batch=5)
    assert preds[0].energy_j == pytest.approx(batch_of_5.energy_j[0] / 5)
    # vLLM's own abort of the parent (client disconnect) drops every child's prediction
    assert svc.pending_count == 5
    aborted = processor.abort_requests([parent.request_id], internal=True)
    assert sorted(aborted) == sorted(ids)
    assert svc.pending_count == 2 and all(svc.prediction(i) is None for i in ids)
    processor.abort_requests(["other0", "other1"], internal=False)  # by external id
    assert svc.pending_count == 0


def test_headers_describe_every_sequence_of_the_response(svc, predictor):
    processor = OutputProcessor(None, log_stats=False)
    processor.add_request(request("busy"), None)
    holder = http_headers.PredictionHolder()
    token = http_headers._HOLDER.set(holder)
    try:
        add_parallel(processor, request("cmpl-y", prompt_len=40, n=3))
    finally:
        http_headers._HOLDER.reset(token)
    batch_of_4 = predictor.predict_many(np.array([40]), np.array([EXPECTED_TOKENS]), batch=4)
    headers = dict(holder.headers())
    assert headers[b"x-llmco2-predicted-sequences"] == b"3"
    assert float(headers[b"x-llmco2-predicted-energy-j"]) == pytest.approx(3 * batch_of_4.energy_j[0] / 4, rel=1e-5)
    assert int(headers[b"x-llmco2-predicted-gen-tokens"]) == 3 * EXPECTED_TOKENS


def test_prompts_of_one_completion_are_one_batch(svc, predictor):
    processor = OutputProcessor(None, log_stats=False)
    seen_by_vllm = []

    async def gen(i):
        yield i

    async def handler():
        # what OpenAIServingCompletion does: one generator per prompt, merged; each generator's
        # add_request runs in its own task (here: one after the other, the arrival-order case)
        merged = http_headers._wrap_merge_async_iterators(lambda *its: its)(gen(0), gen(1), gen(2))
        seen_by_vllm.append(len(merged))
        for k in range(3):
            await asyncio.sleep(0)
            processor.add_request(request(f"cmpl-z-{k}", prompt_len=24 + 8 * k), None)
        for it in merged:
            await it.aclose()

    holder = http_headers.PredictionHolder()

    async def main():
        token = http_headers._HOLDER.set(holder)
        try:
            await asyncio.create_task(handler())
        finally:
            http_headers._HOLDER.reset(token)

    asyncio.run(main())
    assert seen_by_vllm == [3] and holder.prompts == 3
    preds = [svc.prediction(f"cmpl-z-{k}") for k in range(3)]
    assert [p.batch for p in preds] == [3, 3, 3]
    total = 0.0
    for k, p in enumerate(preds):
        exact = predictor.predict_many(np.array([24 + 8 * k]), np.array([EXPECTED_TOKENS]), batch=3)
        assert p.energy_j == pytest.approx(exact.energy_j[0] / 3)
        total += p.energy_j
    assert float(dict(holder.headers())[b"x-llmco2-predicted-energy-j"]) == pytest.approx(total, rel=1e-5)


def test_single_requests_keep_the_in_flight_batch(svc, predictor):
    processor = OutputProcessor(None, log_stats=False)
    for k in range(4):
        processor.add_request(request(f"s{k}"), None)
    assert [svc.prediction(f"s{k}").batch for k in range(4)] == [1, 2, 3, 4]


def test_abort_wrapper_is_fail_open(svc):
    class Broken:
        def forget_many(self, ids):
            raise RuntimeError("service gone")

    _state.state().service = Broken()
    processor = OutputProcessor(None, log_stats=False)
    processor.add_request(request("a"), None)
    assert processor.abort_requests(["a"], internal=True) == ["a"]  # vLLM's result is untouched
    assert _patches.failures["output_processor.abort_requests"] >= 1
