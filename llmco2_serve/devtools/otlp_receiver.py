"""A real OTLP/HTTP receiver on loopback, for tests and the demo.

It speaks the collector side of OTLP/HTTP with protobuf bodies (``POST /v1/traces``,
``POST /v1/metrics``, ``Content-Type: application/x-protobuf``, optional gzip/deflate
``Content-Encoding``), decodes with the ``opentelemetry-proto`` classes and keeps what it
received as plain dicts, so a test can assert on exact attribute names and values after
a real SDK exporter sent them over a real socket.

Span dict keys: ``trace_id``/``span_id`` (lower-case hex), ``parent_span_id`` (hex or
None), ``name``, ``kind`` ("internal", "server", ...), ``start_time_unix_nano``,
``end_time_unix_nano``, ``attributes``, ``status_code`` ("unset"|"ok"|"error"),
``status_message``, ``resource`` (resource attributes), ``scope`` (instrumentation scope
name). :func:`llmco2_serve.runtime.telemetry.span_to_dict` produces the same shape from SDK spans.

Metric data point dict keys: ``name``, ``unit``, ``description``, ``type`` ("sum",
"gauge", "histogram", "exponential_histogram", "summary"), ``attributes``,
``start_time_unix_nano``, ``time_unix_nano``, ``resource``, ``scope``; plus ``value``,
``is_monotonic`` and ``aggregation_temporality`` for sums, ``value`` for gauges, and
``count``, ``sum``, ``bucket_counts``, ``explicit_bounds``, ``min``, ``max``,
``aggregation_temporality`` for histograms.

Command line (for the demo; stops on Ctrl-C)::

    python -m llmco2_serve.devtools.otlp_receiver --port 4318 --jsonl spans.jsonl
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

_logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"
# The OTLP/HTTP exporters refuse to send more than 64 MiB (before compression).
MAX_BODY_BYTES = 64 * 1024 * 1024

Record = dict[str, Any]


@dataclass(frozen=True)
class ReceivedRequest:
    """One POST the receiver answered (accepted or refused)."""

    path: str
    content_type: str
    content_encoding: str  # "" when the body was not compressed
    status_code: int
    n_items: int  # spans or metric data points decoded; 0 when refused


# --- protobuf -> plain python -------------------------------------------------------


def any_value_to_python(value: AnyValue) -> Any:
    """Convert an OTLP ``AnyValue`` into the matching plain Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value_to_python(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return key_values_to_dict(value.kvlist_value.values)
    if kind == "bytes_value":
        return bytes(value.bytes_value)
    return getattr(value, kind)


def key_values_to_dict(key_values: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value_to_python(kv.value) for kv in key_values}


def _enum_suffix(full_name: str, prefix: str) -> str:
    return full_name.removeprefix(prefix).lower()


def span_records(request: ExportTraceServiceRequest) -> list[Record]:
    """Flatten an ``ExportTraceServiceRequest`` into span dicts (see module docstring)."""
    out: list[Record] = []
    for resource_spans in request.resource_spans:
        resource = key_values_to_dict(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                out.append(
                    {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "name": span.name,
                        "kind": _enum_suffix(PbSpan.SpanKind.Name(span.kind), "SPAN_KIND_"),
                        "start_time_unix_nano": span.start_time_unix_nano,
                        "end_time_unix_nano": span.end_time_unix_nano,
                        "attributes": key_values_to_dict(span.attributes),
                        "status_code": _enum_suffix(
                            PbStatus.StatusCode.Name(span.status.code), "STATUS_CODE_"
                        ),
                        "status_message": span.status.message,
                        "resource": resource,
                        "scope": scope,
                    }
                )
    return out


def _temporality(value: int) -> str:
    return _enum_suffix(AggregationTemporality.Name(value), "AGGREGATION_TEMPORALITY_")


def _number_value(point: Any) -> int | float | None:
    kind = point.WhichOneof("value")
    return None if kind is None else getattr(point, kind)


def metric_records(request: ExportMetricsServiceRequest) -> list[Record]:
    """Flatten an ``ExportMetricsServiceRequest`` into data point dicts (see module docstring)."""
    out: list[Record] = []
    for resource_metrics in request.resource_metrics:
        resource = key_values_to_dict(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            scope = scope_metrics.scope.name
            for metric in scope_metrics.metrics:
                data_type = metric.WhichOneof("data")
                if data_type is None:
                    continue
                data = getattr(metric, data_type)
                for point in data.data_points:
                    record: Record = {
                        "name": metric.name,
                        "unit": metric.unit,
                        "description": metric.description,
                        "type": data_type,
                        "attributes": key_values_to_dict(point.attributes),
                        "start_time_unix_nano": point.start_time_unix_nano,
                        "time_unix_nano": point.time_unix_nano,
                        "resource": resource,
                        "scope": scope,
                    }
                    if data_type == "sum":
                        record["value"] = _number_value(point)
                        record["is_monotonic"] = data.is_monotonic
                        record["aggregation_temporality"] = _temporality(data.aggregation_temporality)
                    elif data_type == "gauge":
                        record["value"] = _number_value(point)
                    elif data_type == "histogram":
                        record["count"] = point.count
                        record["sum"] = point.sum if point.HasField("sum") else None
                        record["bucket_counts"] = list(point.bucket_counts)
                        record["explicit_bounds"] = list(point.explicit_bounds)
                        record["min"] = point.min if point.HasField("min") else None
                        record["max"] = point.max if point.HasField("max") else None
                        record["aggregation_temporality"] = _temporality(data.aggregation_temporality)
                    else:  # exponential_histogram, summary: not produced by llmco2-serve
                        record["count"] = point.count
                        record["sum"] = point.sum
                    out.append(record)
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _jsonl_line(signal: str, record: Record) -> str:
    return json.dumps({"signal": signal, **record}, default=_json_default, sort_keys=True) + "\n"


# --- HTTP server -----------------------------------------------------------------------


class _RefusedRequest(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        self.server.receiver._handle_post(self)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        _logger.debug("otlp receiver: " + format, *args)


class _Server(ThreadingHTTPServer):
    # Handler threads must not keep the process (or a test) alive.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], receiver: OtlpReceiver) -> None:
        self.receiver = receiver
        super().__init__(address, _Handler)


class OtlpReceiver:
    """OTLP/HTTP (protobuf) receiver on ``host:port`` in a background thread.

    ``port=0`` picks a free port. ``delay_s`` holds every answer back that long, to play a
    slow collector; stopping the receiver cuts the wait short. ``jsonl_path`` appends
    every received span / data point to that file as it arrives (one JSON object per
    line, with ``"signal": "span" | "metric"``). ``on_span`` is called with each span
    dict in the handler thread.

    Use as a context manager (``with OtlpReceiver() as rx: ...``) or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay_s: float = 0.0,
        jsonl_path: str | Path | None = None,
        on_span: Callable[[Record], None] | None = None,
    ) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port!r}")
        self._host = host
        self._requested_port = port
        self.delay_s = delay_s
        self._jsonl_path = Path(jsonl_path) if jsonl_path is not None else None
        self._on_span = on_span
        self._cond = threading.Condition()
        self._spans: list[Record] = []
        self._metric_points: list[Record] = []
        self._requests: list[ReceivedRequest] = []
        self._in_flight = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._jsonl_file: IO[str] | None = None

    # -- lifecycle --

    def start(self) -> OtlpReceiver:
        if self._server is not None:
            raise RuntimeError("OtlpReceiver already started")
        self._stopping.clear()
        if self._jsonl_path is not None:
            self._jsonl_file = self._jsonl_path.open("a", encoding="utf-8")
        self._server = _Server((self._host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"OtlpReceiver:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # wakes handlers that are playing a slow collector
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)
        self._server = self._thread = None
        with self._cond:
            if self._jsonl_file is not None:
                self._jsonl_file.close()
                self._jsonl_file = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses --

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("OtlpReceiver is not started")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43121`` (what ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes)."""
        return f"http://{self._host}:{self.port}"

    @property
    def traces_endpoint(self) -> str:
        """Full traces URL (what vLLM's ``--otlp-traces-endpoint`` needs with http/protobuf)."""
        return self.endpoint + TRACES_PATH

    @property
    def metrics_endpoint(self) -> str:
        return self.endpoint + METRICS_PATH

    # -- what arrived --

    def spans(self, name: str | None = None) -> list[Record]:
        """Copies of the received spans, in arrival order; only those called ``name`` if given."""
        with self._cond:
            return [copy.deepcopy(s) for s in self._spans if name is None or s["name"] == name]

    def metrics(self, name: str | None = None) -> list[Record]:
        """Copies of the received metric data points, in arrival order."""
        with self._cond:
            return [copy.deepcopy(p) for p in self._metric_points if name is None or p["name"] == name]

    def requests(self) -> list[ReceivedRequest]:
        with self._cond:
            return list(self._requests)

    @property
    def in_flight(self) -> int:
        """Exports received but not answered yet (held back by ``delay_s``)."""
        with self._cond:
            return self._in_flight

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self._metric_points.clear()
            self._requests.clear()

    def wait_for_spans(
        self,
        predicate: Callable[[Record], bool] | None = None,
        timeout_s: float = 5.0,
        *,
        count: int = 1,
    ) -> list[Record]:
        """Block until at least ``count`` received spans satisfy ``predicate``; return them all.

        Raises TimeoutError (listing the span names seen) if that does not happen in time.
        """
        return self._wait(self._spans, predicate, timeout_s, count, "span")

    def wait_for_metrics(
        self,
        predicate: Callable[[Record], bool] | None = None,
        timeout_s: float = 5.0,
        *,
        count: int = 1,
    ) -> list[Record]:
        """Like :meth:`wait_for_spans`, for metric data points."""
        return self._wait(self._metric_points, predicate, timeout_s, count, "metric data point")

    def _wait(
        self,
        store: list[Record],
        predicate: Callable[[Record], bool] | None,
        timeout_s: float,
        count: int,
        what: str,
    ) -> list[Record]:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        deadline = time.monotonic() + timeout_s

        def matching() -> list[Record]:
            return [r for r in store if predicate is None or predicate(r)]

        with self._cond:
            while len(found := matching()) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({r["name"] for r in store})
                    raise TimeoutError(
                        f"wanted {count} matching {what}(s) within {timeout_s} s, got "
                        f"{len(found)}; names received: {names}"
                    )
                self._cond.wait(remaining)
            return [copy.deepcopy(r) for r in found]

    def dump_jsonl(self, path: str | Path) -> int:
        """Write every received span and data point to ``path`` (JSON lines); return the count."""
        with self._cond:
            lines = [_jsonl_line("span", s) for s in self._spans]
            lines += [_jsonl_line("metric", p) for p in self._metric_points]
        Path(path).write_text("".join(lines), encoding="utf-8")
        return len(lines)

    # -- request handling (handler threads) --

    def _handle_post(self, handler: _Handler) -> None:
        path = handler.path.split("?", 1)[0]
        content_type = handler.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        encoding = handler.headers.get("Content-Encoding", "").strip().lower()
        try:
            body = self._read_body(handler, path, content_type, encoding)
            if path == TRACES_PATH:
                trace_request = ExportTraceServiceRequest()
                trace_request.ParseFromString(body)
                spans, points = span_records(trace_request), []
                reply = ExportTraceServiceResponse().SerializeToString()
            else:
                metrics_request = ExportMetricsServiceRequest()
                metrics_request.ParseFromString(body)
                spans, points = [], metric_records(metrics_request)
                reply = ExportMetricsServiceResponse().SerializeToString()
        except _RefusedRequest as refused:
            self._note(ReceivedRequest(path, content_type, encoding, refused.status.value, 0))
            self._reply(handler, refused.status, str(refused).encode(), "text/plain")
            return
        except DecodeError as e:
            self._note(ReceivedRequest(path, content_type, encoding, HTTPStatus.BAD_REQUEST.value, 0))
            self._reply(handler, HTTPStatus.BAD_REQUEST, f"bad protobuf: {e}".encode(), "text/plain")
            return

        if self.delay_s:
            with self._cond:
                self._in_flight += 1
            try:
                if self._stopping.wait(self.delay_s):
                    return  # stopped while "slow": drop the connection unanswered
            finally:
                with self._cond:
                    self._in_flight -= 1
        self._store(spans, points)
        self._note(ReceivedRequest(path, content_type, encoding, HTTPStatus.OK.value, len(spans) + len(points)))
        self._reply(handler, HTTPStatus.OK, reply, PROTOBUF_CONTENT_TYPE)

    @staticmethod
    def _read_body(handler: _Handler, path: str, content_type: str, encoding: str) -> bytes:
        if path not in (TRACES_PATH, METRICS_PATH):
            raise _RefusedRequest(HTTPStatus.NOT_FOUND, f"unknown OTLP path {path!r}")
        if content_type != PROTOBUF_CONTENT_TYPE:
            raise _RefusedRequest(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"only {PROTOBUF_CONTENT_TYPE} is supported, got {content_type!r}",
            )
        length_header = handler.headers.get("Content-Length")
        if length_header is None:
            raise _RefusedRequest(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(length_header)
        except ValueError:
            raise _RefusedRequest(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_header!r}") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise _RefusedRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes refused")
        raw = handler.rfile.read(length)
        try:
            if encoding in ("", "identity"):
                return raw
            if encoding == "gzip":
                return gzip.decompress(raw)
            if encoding == "deflate":
                return zlib.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise _RefusedRequest(HTTPStatus.BAD_REQUEST, f"cannot decode {encoding} body: {e}") from None
        raise _RefusedRequest(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"unsupported Content-Encoding {encoding!r}")

    def _store(self, spans: Sequence[Record], points: Sequence[Record]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self._metric_points.extend(points)
            if self._jsonl_file is not None:
                self._jsonl_file.writelines(_jsonl_line("span", s) for s in spans)
                self._jsonl_file.writelines(_jsonl_line("metric", p) for p in points)
                self._jsonl_file.flush()
            self._cond.notify_all()
        if self._on_span is not None:
            for span in spans:
                self._on_span(copy.deepcopy(span))

    def _note(self, request: ReceivedRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    @staticmethod
    def _reply(handler: _Handler, status: HTTPStatus, body: bytes, content_type: str) -> None:
        handler.send_response(status.value)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


# --- command line ----------------------------------------------------------------------


def _span_summary(span: Record) -> str:
    llmco2 = {k: v for k, v in span["attributes"].items() if k.startswith("llmco2.")}
    return f"span {span['name']} trace={span['trace_id']} {json.dumps(llmco2, sort_keys=True)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmco2_serve.devtools.otlp_receiver",
        description="Local OTLP/HTTP (protobuf) receiver; prints spans, optionally appends them to a JSON-lines file.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318, help="0 picks a free port (default: 4318)")
    parser.add_argument("--jsonl", type=Path, default=None, help="append received spans/data points here")
    parser.add_argument("--delay-s", type=float, default=0.0, help="answer every export this late")
    parser.add_argument("--quiet", action="store_true", help="do not print each span")
    args = parser.parse_args(argv)

    def show(span: Record) -> None:
        print(_span_summary(span), flush=True)

    receiver = OtlpReceiver(
        args.host, args.port, delay_s=args.delay_s, jsonl_path=args.jsonl, on_span=None if args.quiet else show
    )
    with receiver:
        print(f"listening on {receiver.endpoint} (traces: {receiver.traces_endpoint})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
