"""Each patch against the installed vLLM: applies, is idempotent, checks the version, fails open."""

from __future__ import annotations

import asyncio
import logging
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import vllm  # noqa: E402

from llmco2_serve import hooks  # noqa: E402
from llmco2_serve.hooks import _patches, _state, api_server, engine_core, http_headers  # noqa: E402
from llmco2_serve.runtime.service import MEASURED_HEADER  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for k in [k for k in os.environ if k.startswith("LLMCO2_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("LLMCO2_PAIRS_PATH", "")
    _patches.unapply_all()
    _patches.failures.clear()
    _patches._logged.clear()
    _state._STATE = None
    api_server._stash.clear()
    yield
    _patches.unapply_all()
    _state._STATE = None


def originals():
    return {name: _patches._resolve(spec.target) for name, spec in _patches.LEDGER.items()}


def current(name):
    owner, attr = _patches._resolve(_patches.LEDGER[name].target)
    return getattr(owner, attr)


def test_every_ledger_entry_applies_and_is_idempotent():
    before = {n: current(n) for n in _patches.LEDGER}
    hooks.register_general_plugin()
    assert _patches.applied() == sorted(_patches.LEDGER)
    installed = {n: current(n) for n in _patches.LEDGER}
    for n in _patches.LEDGER:
        assert installed[n] is not before[n] and getattr(installed[n], _patches.MARK) == n
        assert installed[n].__wrapped__ is before[n]
    hooks.register_general_plugin()  # same process: no-op
    _state._STATE = None  # a fresh process that inherited the patches (fork)
    hooks.register_general_plugin()
    assert {n: current(n) for n in _patches.LEDGER} == installed  # not wrapped twice
    assert not _patches.failures
    _patches.unapply_all()
    assert {n: current(n) for n in _patches.LEDGER} == before


def test_every_ledger_entry_is_documented():
    for spec in _patches.LEDGER.values():
        assert spec.why and spec.how and spec.future and "0.32" in spec.vllm_versions
    assert "scheduler.schedule" in _patches.ledger_summary()


@pytest.mark.parametrize("version,ok", [("0.32.0", True), ("0.32.3", True), ("0.33.0", True),
                                        ("0.33.1.dev5+g1234", True), ("0.31.2", False), ("0.34.0", False),
                                        ("1.0.0", False), ("garbage", False)])
def test_version_range(version, ok):
    assert _patches.vllm_version_supported(version) is ok


def test_unsupported_vllm_version_patches_nothing(monkeypatch, caplog):
    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    with caplog.at_level(logging.WARNING, logger="vllm.llmco2"):
        hooks.register_general_plugin()
        hooks.register_general_plugin()
    assert _patches.applied() == []
    assert not _state.state().active and "0.40.0" in _state.state().inactive_reason
    assert sum("outside the tested range" in r.message for r in caplog.records) == 1  # logged once


def test_disabled_patches_nothing(monkeypatch):
    monkeypatch.setenv("LLMCO2_ENABLED", "0")
    hooks.register_general_plugin()
    assert _patches.applied() == [] and _state.state().inactive_reason == "LLMCO2_ENABLED=0"


def test_invalid_settings_fail_open_or_raise(monkeypatch):
    monkeypatch.setenv("LLMCO2_PUE", "0.5")
    hooks.register_general_plugin()
    assert _patches.applied() == [] and "LLMCO2_PUE" in _state.state().inactive_reason
    _state._STATE = None
    monkeypatch.setenv("LLMCO2_FAIL_OPEN", "0")
    from llmco2_serve.runtime.settings import SettingsError
    with pytest.raises(SettingsError, match="LLMCO2_PUE"):
        hooks.register_general_plugin()


def test_missing_target_fails_open_and_others_apply(monkeypatch):
    bad = _patches.PatchSpec("scheduler.schedule", "vllm.v1.core.sched.scheduler:Scheduler.no_such_method",
                             "w", "h", "0.32", "f")
    monkeypatch.setitem(_patches.LEDGER, "scheduler.schedule", bad)
    hooks.register_general_plugin()
    assert "scheduler.schedule" not in _patches.applied()
    assert "scheduler.update_from_output" in _patches.applied()
    assert _patches.failures["scheduler.schedule"] == 1


def test_schedule_wrapper_fails_open_when_vllm_objects_change():
    calls = []

    def orig(self):
        calls.append(self)
        return SimpleNamespace()  # a SchedulerOutput without the fields we read

    wrapped = engine_core._wrap_schedule(orig)
    sched = SimpleNamespace(vllm_config=None, requests={})
    sched.__dict__[engine_core._ATTR] = engine_core._Disabled()
    sched.__dict__[engine_core._ATTR].meter = SimpleNamespace(step_started=lambda *a: None)
    sched.__dict__[engine_core._ATTR].pid = os.getpid()
    out = wrapped(sched)
    out2 = wrapped(sched)
    assert calls == [sched, sched] and isinstance(out, SimpleNamespace) and isinstance(out2, SimpleNamespace)
    assert _patches.failures["scheduler.schedule"] == 2


def test_engine_side_setup_failure_disables_meter_once():
    sched = SimpleNamespace(vllm_config=None, requests={})  # model_info() cannot read this
    side = engine_core.engine_side(sched)
    assert side.meter is None and engine_core.engine_side(sched) is side
    assert _patches.failures["scheduler.schedule"] == 1


def test_step_rows_phase_detection():
    req = lambda computed, prompt: SimpleNamespace(num_computed_tokens=computed, num_prompt_tokens=prompt)  # noqa: E731
    sched = SimpleNamespace(requests={
        "new": req(32, 100),       # first chunk of a 100-token prompt: 0 -> 32
        "chunk": req(100, 100),    # last chunk 64 -> 100
        "dec": req(151, 100),      # decode at context 150
        "spec": req(203, 100),     # decode + 2 speculative tokens at context 200
        "resumed": req(129, 100),  # recompute of 129 tokens after preemption, no prefix hit
        "cached": req(129, 100),   # resumed with positions 0-95 in the prefix cache: 96 -> 129
    })
    so = SimpleNamespace(num_scheduled_tokens={"new": 32, "chunk": 36, "dec": 1, "spec": 3, "resumed": 129,
                                               "cached": 33, "gone": 1},
                         scheduled_spec_decode_tokens={"spec": [5, 6]})
    # Phase by position (issue 6.7): prompt positions are prefill, generated ones decode, also
    # when they are recomputed after a preemption; a straddling chunk becomes two rows.
    assert engine_core.step_rows(sched, so) == [
        ("new", "prefill", 32, 0), ("chunk", "prefill", 36, 64), ("dec", "decode", 1, 150),
        ("spec", "decode", 3, 200), ("resumed", "prefill", 100, 0), ("resumed", "decode", 29, 100),
        ("cached", "prefill", 4, 96), ("cached", "decode", 29, 100)]


def test_update_from_output_attaches_measurement_to_final_output_only():
    side = engine_core._Disabled()
    side.headers = {"r1": '{"source":"x"}', "r2": '{"source":"y"}'}
    fin = SimpleNamespace(request_id="r1", finish_reason="stop", trace_headers={"traceparent": "tp"})
    running = SimpleNamespace(request_id="r2", finish_reason=None, trace_headers=None)
    engine_core._attach_headers(side, {0: SimpleNamespace(outputs=[fin, running])})
    assert fin.trace_headers == {"traceparent": "tp", MEASURED_HEADER: '{"source":"x"}'}
    assert running.trace_headers is None and side.headers == {"r2": '{"source":"y"}'}


def test_instrument_manual_wrapper_adds_attributes_to_llm_request_only():
    seen = []

    def orig(span_name, start_time, end_time=None, attributes=None, context=None, kind=None):
        seen.append((span_name, dict(attributes or {})))

    wrapped = api_server._wrap_instrument_manual(orig)
    token = api_server._SPAN_ATTRS.set({"llmco2.predicted.energy_j": 1.5})
    try:
        wrapped(span_name="llm_request", start_time=1, attributes={"gen_ai.request.id": "x"})
        wrapped("llm_request", 1, None, {"a": 1})
        wrapped(span_name="other", start_time=1, attributes={"b": 2})
    finally:
        api_server._SPAN_ATTRS.reset(token)
    wrapped(span_name="llm_request", start_time=1, attributes={"c": 3})
    assert seen == [("llm_request", {"gen_ai.request.id": "x", "llmco2.predicted.energy_j": 1.5}),
                    ("llm_request", {"a": 1, "llmco2.predicted.energy_j": 1.5}),
                    ("other", {"b": 2}), ("llm_request", {"c": 3})]


def test_add_request_wrapper_fails_open_and_always_calls_vllm():
    hooks.register_general_plugin()
    st = _state.state()

    class Boom:
        def on_request(self, *a):
            raise RuntimeError("predictor exploded")
    st.service = Boom()
    calls = []
    wrapped = api_server._wrap_add_request(lambda self, request, *a, **k: calls.append(request) or "ok")
    request = SimpleNamespace(request_id="i1", prompt_token_ids=[1, 2, 3],
                              sampling_params=SimpleNamespace(max_tokens=5))
    processor = SimpleNamespace(request_states={})
    assert wrapped(processor, request, None) == "ok" and calls == [request]
    assert _patches.failures["output_processor.add_request"] == 1


def test_process_outputs_reads_and_strips_measurement():
    hooks.register_general_plugin()
    st = _state.state()
    got = []

    class Svc:
        def on_finished(self, rid, gen, measured, span=True):
            got.append((rid, gen, measured["energy_j"], measured["source"], span))
            return {"llmco2.measured.source": measured["source"]}
    st.service = Svc()
    seen_stash = []
    wrapped = api_server._wrap_process_outputs(lambda self, outs, *a, **k: seen_stash.append(dict(api_server._stash)))

    def output():
        return SimpleNamespace(request_id="r", finish_reason="length", trace_headers={
            "traceparent": "tp", MEASURED_HEADER: '{"energy_j":2.5,"prefill_energy_j":1,"decode_energy_j":1.5,'
                                                  '"uncertainty_j":null,"source":"nvml","gen_tokens":4}'})
    o = output()
    wrapped(SimpleNamespace(request_states={"r": object()}, tracing_enabled=True), [o])
    assert got == [("r", 4, 2.5, "nvml", True)]
    assert o.trace_headers == {"traceparent": "tp"}
    assert seen_stash == [{"r": {"llmco2.measured.source": "nvml"}}] and api_server._stash == {}
    # Tracing off (vLLM's default): no span will be built, so only the response's part is asked
    # for and nothing waits in the stash for a do_tracing that never comes.
    got.clear(), seen_stash.clear()
    o = output()
    wrapped(SimpleNamespace(request_states={"r": object()}, tracing_enabled=False), [o])
    assert got == [("r", 4, 2.5, "nvml", False)]
    assert o.trace_headers == {"traceparent": "tp"}
    assert seen_stash == [{}] and api_server._stash == {}


def test_headers_middleware_holds_start_until_body_and_sums_predictions():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        holder = http_headers.current_holder()  # what add_request does, after the start was "sent"
        for e in (1.0, 2.0):
            holder.add(SimpleNamespace(energy_j=e, co2_g=e / 10, energy_j_upper=2 * e, gen_tokens=3))
        await send({"type": "http.response.body", "body": b"x"})

    sent = []

    async def send(msg):
        sent.append(msg)

    asyncio.run(http_headers.LLMCO2HeadersMiddleware(app)({"type": "http"}, None, send))
    headers = dict(sent[0]["headers"])
    assert sent[0]["type"] == "http.response.start" and sent[1]["type"] == "http.response.body"
    assert headers[b"x-llmco2-predicted-energy-j"] == b"3" and headers[b"x-llmco2-predicted-co2-g"] == b"0.3"
    assert headers[b"x-llmco2-predicted-energy-j-upper"] == b"6"
    assert headers[b"x-llmco2-predicted-gen-tokens"] == b"6"
    assert http_headers.current_holder() is None


def test_middleware_is_added_only_when_headers_enabled(monkeypatch):
    added = []
    app = SimpleNamespace(add_middleware=lambda cls: added.append(cls))
    hooks.register_general_plugin()
    http_headers._wrap_init_middleware(lambda args, app, *a: None)(None, app, ())
    assert added == [http_headers.LLMCO2HeadersMiddleware]
    _state._STATE = None
    _patches.unapply_all()
    monkeypatch.setenv("LLMCO2_RESPONSE_HEADERS", "0")
    hooks.register_general_plugin()
    http_headers._wrap_init_middleware(lambda args, app, *a: None)(None, app, ())
    assert added == [http_headers.LLMCO2HeadersMiddleware]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_state_is_recreated_after_fork():
    # A real fork (as vLLM forks the engine core from the API server on GPU): the child must not
    # see the parent's service, but keeps the settings and the on/off decision. state() caches the
    # process's state; the cache must not survive the fork.
    hooks.register_general_plugin()
    st = _state.state()
    st.service = object()
    assert _state.state() is st  # cached in the parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave without running pytest's teardown
        try:
            child = _state.state()
            ok = (child is not st and child.pid == os.getpid() and child.active and child.service is None
                  and child.settings is st.settings and _state.state() is child)
            os.write(w, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 8) == b"ok"
    os.close(r)
    assert _state.state() is st and st.service is not None  # the parent's is untouched


def test_stat_logger_is_a_stat_logger_and_builds_the_service(tmp_path):
    from vllm.v1.metrics.loggers import StatLoggerBase

    from llmco2_serve.hooks.stat_logger import LLMCO2StatLogger
    from llmco2_serve.devtools.tinymodel import tiny_config

    assert issubclass(LLMCO2StatLogger, StatLoggerBase)
    hooks.register_general_plugin()
    cfg = {**tiny_config("llama"), "torch_dtype": "float32"}
    vc = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: cfg), hf_text_config=None,
                                     dtype="torch.float32", served_model_name="tiny", model="/m",
                                     quantization=None, max_model_len=256, architectures=["LlamaForCausalLM"]),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="auto"), scheduler_config=SimpleNamespace(max_num_seqs=4))
    logger = LLMCO2StatLogger(vc, 0)
    svc = logger.service
    assert svc is not None and svc.predictor is not None and svc.model.model_name == "tiny"
    assert svc.model.dtype == "float32" and svc.model.max_num_seqs == 4
    assert LLMCO2StatLogger(vc, 1).service is svc  # one per process
    logger.record(None, None)
    logger.log()
    logger.log_engine_initialized()


def test_register_is_fail_open_when_the_plugin_itself_is_broken(monkeypatch, caplog):
    import llmco2_serve.hooks as hooks

    def broken():
        raise ImportError("simulated broken install")

    monkeypatch.setattr(hooks, "_register", broken)
    monkeypatch.delenv("LLMCO2_FAIL_OPEN", raising=False)
    with caplog.at_level("ERROR", logger="vllm.llmco2"):
        hooks.register_general_plugin()  # must not raise into vLLM
    assert "plugin failed to register" in caplog.text
    monkeypatch.setenv("LLMCO2_FAIL_OPEN", "0")
    with pytest.raises(ImportError):
        hooks.register_general_plugin()


def test_model_info_reads_data_parallel_and_api_servers_from_vllms_parallel_config():
    """The fields read are vLLM's own (a renamed field fails here, not silently in a server)."""
    from vllm.config import ParallelConfig

    from llmco2_serve.hooks._vllm_config import engines_per_api_server

    default = ParallelConfig()
    for name in ("data_parallel_size", "data_parallel_size_local", "data_parallel_external_lb",
                 "data_parallel_hybrid_lb", "_api_process_count"):
        assert hasattr(default, name), name

    def pc(**kw):
        base = dict(data_parallel_size=4, data_parallel_size_local=2, data_parallel_external_lb=False,
                    data_parallel_hybrid_lb=False)
        return SimpleNamespace(**{**base, **kw})

    assert engines_per_api_server(pc()) == 4  # internal load balancing: every engine
    assert engines_per_api_server(pc(data_parallel_hybrid_lb=True)) == 2  # this node's engines
    assert engines_per_api_server(pc(data_parallel_external_lb=True)) == 1  # its own engine
    assert engines_per_api_server(SimpleNamespace()) == 1  # an older vLLM without data parallelism
    assert engines_per_api_server(default) == 1 and default._api_process_count == 1
