"""The local OTLP/HTTP receiver: real sockets, hand-built protobuf bodies, real SDK exporters."""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from llmco2_serve.devtools import OtlpReceiver

PROTOBUF = "application/x-protobuf"
TRACE_ID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SPAN_ID = bytes.fromhex("00f067aa0ba902b7")
CHILD_ID = bytes.fromhex("1111111111111111")


def kv(key: str, value: AnyValue) -> KeyValue:
    return KeyValue(key=key, value=value)


def trace_request() -> ExportTraceServiceRequest:
    attributes = [
        kv("s", AnyValue(string_value="nvml")),
        kv("i", AnyValue(int_value=128)),
        kv("d", AnyValue(double_value=42.75)),
        kv("b", AnyValue(bool_value=True)),
        kv("arr", AnyValue(array_value=ArrayValue(values=[AnyValue(int_value=1), AnyValue(string_value="x")]))),
        kv("kvl", AnyValue(kvlist_value=KeyValueList(values=[kv("k", AnyValue(double_value=0.5))]))),
        kv("raw", AnyValue(bytes_value=b"\x01\x02")),
    ]
    root = trace_pb2.Span(
        trace_id=TRACE_ID,
        span_id=SPAN_ID,
        name="llm_request",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=1_000,
        end_time_unix_nano=2_500,
        attributes=attributes,
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_ERROR, message="boom"),
    )
    child = trace_pb2.Span(
        trace_id=TRACE_ID,
        span_id=CHILD_ID,
        parent_span_id=SPAN_ID,
        name="llmco2.request",
        kind=trace_pb2.Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=1_100,
        end_time_unix_nano=2_400,
    )
    return ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=Resource(attributes=[kv("service.name", AnyValue(string_value="vllm"))]),
                scope_spans=[
                    trace_pb2.ScopeSpans(scope=InstrumentationScope(name="vllm.tracing"), spans=[root, child])
                ],
            )
        ]
    )


EXPECTED_ROOT = {
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    "span_id": "00f067aa0ba902b7",
    "parent_span_id": None,
    "name": "llm_request",
    "kind": "server",
    "start_time_unix_nano": 1_000,
    "end_time_unix_nano": 2_500,
    "attributes": {
        "s": "nvml",
        "i": 128,
        "d": 42.75,
        "b": True,
        "arr": [1, "x"],
        "kvl": {"k": 0.5},
        "raw": b"\x01\x02",
    },
    "status_code": "error",
    "status_message": "boom",
    "resource": {"service.name": "vllm"},
    "scope": "vllm.tracing",
}


def metrics_request() -> ExportMetricsServiceRequest:
    cumulative = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    counter = metrics_pb2.Metric(
        name="llmco2.energy",
        unit="J",
        description="energy",
        sum=metrics_pb2.Sum(
            is_monotonic=True,
            aggregation_temporality=cumulative,
            data_points=[
                metrics_pb2.NumberDataPoint(
                    attributes=[kv("phase", AnyValue(string_value="decode"))],
                    start_time_unix_nano=10,
                    time_unix_nano=20,
                    as_double=30.5,
                )
            ],
        ),
    )
    gauge = metrics_pb2.Metric(
        name="queue",
        unit="1",
        gauge=metrics_pb2.Gauge(data_points=[metrics_pb2.NumberDataPoint(time_unix_nano=20, as_int=7)]),
    )
    histogram = metrics_pb2.Metric(
        name="llmco2.prediction.relative_error",
        unit="1",
        histogram=metrics_pb2.Histogram(
            aggregation_temporality=cumulative,
            data_points=[
                metrics_pb2.HistogramDataPoint(
                    attributes=[kv("phase", AnyValue(string_value="total"))],
                    start_time_unix_nano=10,
                    time_unix_nano=20,
                    count=2,
                    sum=0.36,
                    bucket_counts=[0, 1, 1],
                    explicit_bounds=[0.1, 0.2],
                    min=0.16,
                    max=0.2,
                )
            ],
        ),
    )
    return ExportMetricsServiceRequest(
        resource_metrics=[
            metrics_pb2.ResourceMetrics(
                resource=Resource(attributes=[kv("service.name", AnyValue(string_value="llmco2-serve"))]),
                scope_metrics=[
                    metrics_pb2.ScopeMetrics(
                        scope=InstrumentationScope(name="llmco2_serve"), metrics=[counter, gauge, histogram]
                    )
                ],
            )
        ]
    )


def post(
    rx: OtlpReceiver, path: str, body: bytes, content_type: str = PROTOBUF, encoding: str | None = None
) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", rx.port, timeout=10)
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


@pytest.fixture
def rx():
    with OtlpReceiver() as receiver:
        yield receiver


def test_endpoint_urls_name_loopback_and_the_signal_paths(rx: OtlpReceiver) -> None:
    assert rx.endpoint == f"http://127.0.0.1:{rx.port}"
    assert rx.traces_endpoint == rx.endpoint + "/v1/traces"
    assert rx.metrics_endpoint == rx.endpoint + "/v1/metrics"
    assert rx.port != 0


@pytest.mark.parametrize("encoding", [None, "gzip", "deflate"])
def test_trace_request_is_decoded_into_plain_dicts(rx: OtlpReceiver, encoding: str | None) -> None:
    body = trace_request().SerializeToString()
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)

    status, content_type, reply = post(rx, "/v1/traces", body, encoding=encoding)

    assert status == 200
    assert content_type == PROTOBUF
    ExportTraceServiceResponse().ParseFromString(reply)  # a valid (empty) OTLP response
    root, child = rx.spans()
    assert root == EXPECTED_ROOT
    assert child["parent_span_id"] == "00f067aa0ba902b7"
    assert child["trace_id"] == root["trace_id"]
    assert (child["kind"], child["status_code"], child["attributes"]) == ("internal", "unset", {})
    assert rx.spans(name="llmco2.request") == [child]
    (request,) = rx.requests()
    assert (request.path, request.content_encoding, request.status_code, request.n_items) == (
        "/v1/traces",
        encoding or "",
        200,
        2,
    )


def test_metrics_request_is_decoded_into_data_points(rx: OtlpReceiver) -> None:
    status, _, _ = post(rx, "/v1/metrics", metrics_request().SerializeToString())

    assert status == 200
    counter, gauge, histogram = rx.metrics()
    resource = {"service.name": "llmco2-serve"}
    assert counter == {
        "name": "llmco2.energy",
        "unit": "J",
        "description": "energy",
        "type": "sum",
        "attributes": {"phase": "decode"},
        "start_time_unix_nano": 10,
        "time_unix_nano": 20,
        "resource": resource,
        "scope": "llmco2_serve",
        "value": 30.5,
        "is_monotonic": True,
        "aggregation_temporality": "cumulative",
    }
    assert (gauge["type"], gauge["value"], gauge["attributes"]) == ("gauge", 7, {})
    assert histogram["type"] == "histogram"
    assert {k: histogram[k] for k in ("count", "sum", "bucket_counts", "explicit_bounds", "min", "max")} == {
        "count": 2,
        "sum": 0.36,
        "bucket_counts": [0, 1, 1],
        "explicit_bounds": [0.1, 0.2],
        "min": 0.16,
        "max": 0.2,
    }
    assert rx.metrics(name="queue") == [gauge]
    assert rx.spans() == []


@pytest.mark.parametrize(
    ("path", "content_type", "encoding", "body", "expected_status"),
    [
        ("/v1/logs", PROTOBUF, None, b"", 404),
        ("/v1/traces", "application/json", None, b"{}", 415),
        ("/v1/traces", PROTOBUF, "br", b"xx", 415),
        ("/v1/traces", PROTOBUF, "gzip", b"not gzip", 400),
        ("/v1/metrics", PROTOBUF, None, b"\xff\xff\xff", 400),
    ],
)
def test_malformed_exports_are_refused_and_not_stored(
    rx: OtlpReceiver, path: str, content_type: str, encoding: str | None, body: bytes, expected_status: int
) -> None:
    status, _, _ = post(rx, path, body, content_type=content_type, encoding=encoding)

    assert status == expected_status
    assert rx.spans() == [] and rx.metrics() == []
    assert [r.status_code for r in rx.requests()] == [expected_status]


def test_real_sdk_exporter_with_gzip_reaches_the_receiver(rx: OtlpReceiver) -> None:
    provider = TracerProvider(resource=SdkResource.create({"service.name": "probe"}), shutdown_on_exit=False)
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=rx.traces_endpoint, compression=Compression.Gzip, timeout=5))
    )
    tracer = provider.get_tracer("probe-scope")
    with tracer.start_as_current_span("outer", attributes={"n": 3, "ratio": 0.25}) as outer:
        with tracer.start_as_current_span("inner"):
            pass
    provider.shutdown()

    inner, outer_span = rx.spans()  # SimpleSpanProcessor exports each span as it ends
    assert outer_span["attributes"] == {"n": 3, "ratio": 0.25}
    assert outer_span["trace_id"] == format(outer.get_span_context().trace_id, "032x")
    assert inner["parent_span_id"] == outer_span["span_id"]
    assert outer_span["resource"]["service.name"] == "probe"
    assert outer_span["scope"] == "probe-scope"
    assert {r.content_encoding for r in rx.requests()} == {"gzip"}


def test_wait_for_spans_returns_when_a_late_export_arrives(rx: OtlpReceiver) -> None:
    body = trace_request().SerializeToString()
    sender = threading.Timer(0.2, post, args=(rx, "/v1/traces", body))
    sender.start()
    try:
        found = rx.wait_for_spans(lambda s: s["name"] == "llmco2.request", timeout_s=5.0)
    finally:
        sender.join()
    assert [s["span_id"] for s in found] == ["1111111111111111"]


def test_wait_for_spans_times_out_naming_what_arrived(rx: OtlpReceiver) -> None:
    post(rx, "/v1/traces", trace_request().SerializeToString())
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"llm_request"):
        rx.wait_for_spans(lambda s: s["name"] == "never", timeout_s=0.2)
    assert 0.2 <= time.monotonic() - started < 2.0
    with pytest.raises(TimeoutError, match=r"got 2"):
        rx.wait_for_spans(timeout_s=0.05, count=3)


def test_delay_holds_the_answer_back_and_stop_cuts_it_short() -> None:
    body = trace_request().SerializeToString()
    with OtlpReceiver(delay_s=0.3) as slow:
        started = time.monotonic()
        status, _, _ = post(slow, "/v1/traces", body)
        assert status == 200
        assert time.monotonic() - started >= 0.3

    very_slow = OtlpReceiver(delay_s=30.0).start()
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(post(very_slow, "/v1/traces", body))
        except (http.client.HTTPException, ConnectionError) as e:
            outcome.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 5.0
    while very_slow.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert very_slow.in_flight == 1
    started = time.monotonic()
    very_slow.stop()
    assert time.monotonic() - started < 2.0
    sender.join(timeout=5.0)
    assert len(outcome) == 1 and isinstance(outcome[0], (http.client.HTTPException, ConnectionError))
    assert very_slow.spans() == []  # never acknowledged, so not received


def test_dump_jsonl_and_live_jsonl_hold_every_span_and_point(tmp_path: Path) -> None:
    live = tmp_path / "live.jsonl"
    seen: list[str] = []
    with OtlpReceiver(jsonl_path=live, on_span=lambda s: seen.append(s["name"])) as receiver:
        post(receiver, "/v1/traces", trace_request().SerializeToString())
        post(receiver, "/v1/metrics", metrics_request().SerializeToString())
        dumped = tmp_path / "dump.jsonl"
        assert receiver.dump_jsonl(dumped) == 5

    for path in (dumped, live):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["signal"], r["name"]) for r in rows] == [
            ("span", "llm_request"),
            ("span", "llmco2.request"),
            ("metric", "llmco2.energy"),
            ("metric", "queue"),
            ("metric", "llmco2.prediction.relative_error"),
        ]
        assert rows[0]["attributes"]["raw"] == "0102"  # bytes as hex in JSON
        assert rows[0]["attributes"]["d"] == 42.75
    assert seen == ["llm_request", "llmco2.request"]


def test_command_line_receiver_prints_and_appends_spans(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmco2_serve.devtools.otlp_receiver", "--port", "0", "--jsonl", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        banner = proc.stdout.readline()  # type: ignore[union-attr]
        assert banner.startswith("listening on http://127.0.0.1:"), banner
        port = int(banner.split("http://127.0.0.1:")[1].split()[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/traces", body=trace_request().SerializeToString(), headers={"Content-Type": PROTOBUF})
        assert conn.getresponse().status == 200
        conn.close()
        first = proc.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("span llm_request trace=4bf92f3577b34da6a3ce929d0e0e4736")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["name"] for r in rows] == ["llm_request", "llmco2.request"]
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


_VLLM_SCRIPT = """
import os, sys
# vLLM reads only the traces-specific variable, and defaults to grpc.
os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from vllm.tracing import init_tracer
from vllm.tracing.otel import get_span_exporter

traces_endpoint, base_endpoint = sys.argv[1], sys.argv[2]
tracer = init_tracer("vllm.entrypoints.openai.api_server", traces_endpoint)
with tracer.start_as_current_span("llm_request", attributes={"gen_ai.request.id": "cmpl-1"}):
    pass
trace.get_tracer_provider().force_flush()
# vLLM hands its endpoint to the HTTP exporter verbatim: a base URL posts to "/".
private = TracerProvider(shutdown_on_exit=False)
private.add_span_processor(SimpleSpanProcessor(get_span_exporter(base_endpoint)))
private.get_tracer("probe").start_span("lost").end()
private.shutdown()
print("OK")
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_exports_to_the_receiver_over_http_protobuf(rx: OtlpReceiver) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    result = subprocess.run(
        [sys.executable, "-c", _VLLM_SCRIPT, rx.traces_endpoint, rx.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (span,) = rx.spans()
    assert (span["name"], span["attributes"]) == ("llm_request", {"gen_ai.request.id": "cmpl-1"})
    assert span["resource"]["vllm.instrumenting_module_name"] == "vllm.entrypoints.openai.api_server"
    assert [(r.path, r.status_code) for r in rx.requests()] == [("/v1/traces", 200), ("/", 404)]
