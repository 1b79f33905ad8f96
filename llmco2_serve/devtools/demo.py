"""Demo: replay a slice of the Azure LLM trace against vLLM with the llmco2 plugin.

Run::

    python -m llmco2_serve.devtools.demo [--model DIR | --family llama] [--requests 12]
                                [--trace conv|code] [--out DIR]

Without ``--model`` it builds a tiny random-weight model (CPU). It starts a local OTLP/HTTP
receiver that appends every span to ``<out>/spans.jsonl``, starts vLLM with the plugin
and ``--otlp-traces-endpoint`` pointing at the receiver, replays the first ``--requests``
rows of the packaged trace slice (see ``data/AZURE_TRACE.md``) against ``/v1/completions``
with the trace's relative arrival times (``--speedup`` times faster) and a W3C
``traceparent`` per request, then prints one row per request: predicted energy (prefill,
decode, total) and carbon, measured energy with its uncertainty and source, measured
carbon; from vLLM's ``llm_request`` span (matched on the trace id) and the response
headers. Writes the same table to ``<out>/requests.csv``. The server is always stopped.

Prompt lengths are scaled to fit the model's context (``--prompt-scale``; on the CPU build
1/16 and ``--max-model-len 512``), each prompt is ``k`` token ids drawn from the model's
vocabulary (special tokens excluded), and ``max_tokens`` is the trace's generated tokens
capped at ``--max-gen-tokens``, with ``ignore_eos`` so the request generates exactly that.
On a GPU machine (the official ``vllm`` wheel) pass ``--model``; the defaults then keep the
trace's own lengths (``--prompt-scale 1``, ``--max-model-len 8192``).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import math
import random
import secrets
import signal
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "CompletionResult",
    "ScaledRequest",
    "TraceRequest",
    "build_table_rows",
    "format_table",
    "llm_request_spans_by_trace_id",
    "load_trace_slice",
    "main",
    "make_traceparent",
    "parse_trace_timestamp",
    "post_completion",
    "prompt_token_ids",
    "replay",
    "scale_requests",
    "usable_token_ids",
    "write_csv",
]

TRACE_SLICE_RESOURCE = "azure_trace_slice.csv"
TRACES = ("code", "conv")
SPAN_NAME = "llm_request"
# Span attributes and response headers written by the plugin (hooks/); absent ones print "-".
ATTR_PRED_PREFILL_J = "llmco2.predicted.prefill_energy_j"
ATTR_PRED_DECODE_J = "llmco2.predicted.decode_energy_j"
ATTR_PRED_J = "llmco2.predicted.energy_j"
ATTR_PRED_CO2_G = "llmco2.predicted.co2_g"
ATTR_PRED_GEN = "llmco2.predicted.gen_tokens"
ATTR_MEAS_PREFILL_J = "llmco2.measured.prefill_energy_j"
ATTR_MEAS_DECODE_J = "llmco2.measured.decode_energy_j"
ATTR_MEAS_J = "llmco2.measured.energy_j"
ATTR_MEAS_CO2_G = "llmco2.measured.co2_g"
ATTR_MEAS_SOURCE = "llmco2.measured.source"
ATTR_MEAS_UNC_J = "llmco2.measured.uncertainty_j"
HEADER_PRED_J = "x-llmco2-predicted-energy-j"
HEADER_PRED_CO2_G = "x-llmco2-predicted-co2-g"
MISSING = "-"


# --- the trace slice -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRequest:
    """One row of the Azure trace slice; ``arrival_s`` is relative to its trace's first row."""

    trace: str
    row: int
    timestamp: str
    arrival_s: float
    context_tokens: int
    generated_tokens: int


def parse_trace_timestamp(text: str) -> float:
    """Seconds since the epoch of a trace ``TIMESTAMP`` (``2023-11-16 18:40:46.1532920``, UTC).

    The fraction has 7 digits (100 ns); it is kept exactly, not rounded to microseconds.
    """
    base, _, fraction = text.strip().partition(".")
    try:
        whole = datetime.strptime(base, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"TIMESTAMP {text!r} is not 'YYYY-MM-DD HH:MM:SS[.fffffff]'") from None
    if fraction and not fraction.isdigit():
        raise ValueError(f"TIMESTAMP {text!r} has a non-numeric fraction")
    return whole.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def load_trace_slice(trace: str | None = None, path: str | Path | None = None) -> list[TraceRequest]:
    """Rows of the packaged slice (or of ``path``), in file order; only ``trace`` if given."""
    if trace is not None and trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if path is None:
        text = resources.files("llmco2_serve.data").joinpath(TRACE_SLICE_RESOURCE).read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    first_arrival: dict[str, float] = {}
    out = []
    for line_no, r in enumerate(rows, start=2):
        try:
            name = r["trace"]
            t = parse_trace_timestamp(r["TIMESTAMP"])
            request = TraceRequest(
                trace=name,
                row=int(r["row"]),
                timestamp=r["TIMESTAMP"],
                arrival_s=t - first_arrival.setdefault(name, t),
                context_tokens=int(r["ContextTokens"]),
                generated_tokens=int(r["GeneratedTokens"]),
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"trace slice line {line_no}: {e}") from None
        if request.context_tokens < 1 or request.generated_tokens < 1:
            raise ValueError(f"trace slice line {line_no}: token counts must be >= 1, got {r}")
        if trace is None or name == trace:
            out.append(request)
    return out


# --- scaling to the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledRequest:
    """A trace row fitted to the served model: ``prompt_tokens + max_tokens <= max_model_len``."""

    index: int
    source: TraceRequest
    prompt_tokens: int
    max_tokens: int
    send_at_s: float  # after the replay starts


def scale_requests(
    requests: Sequence[TraceRequest],
    *,
    max_model_len: int,
    prompt_scale: float,
    max_gen_tokens: int,
    speedup: float = 1.0,
) -> list[ScaledRequest]:
    """Fit trace rows to a model.

    ``max_tokens = min(generated, max_gen_tokens, max_model_len - 1)``;
    ``prompt = clamp(round(context * prompt_scale), 1, max_model_len - max_tokens)``;
    ``send_at_s = (arrival - first arrival) / speedup``.
    """
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len!r}")
    if not prompt_scale > 0:
        raise ValueError(f"prompt_scale must be > 0, got {prompt_scale!r}")
    if max_gen_tokens < 1:
        raise ValueError(f"max_gen_tokens must be >= 1, got {max_gen_tokens!r}")
    if not speedup > 0:
        raise ValueError(f"speedup must be > 0, got {speedup!r}")
    if not requests:
        return []
    t0 = requests[0].arrival_s
    out = []
    for i, r in enumerate(requests):
        max_tokens = min(r.generated_tokens, max_gen_tokens, max_model_len - 1)
        prompt = min(max(round(r.context_tokens * prompt_scale), 1), max_model_len - max_tokens)
        out.append(ScaledRequest(i, r, prompt, max_tokens, max(r.arrival_s - t0, 0.0) / speedup))
    return out


def _special_ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def usable_token_ids(model_dir: str | Path) -> list[int]:
    """Token ids of the model's vocabulary that are not special tokens.

    Vocabulary size from ``config.json`` (``text_config`` for multimodal configs); special
    ids from its ``bos/eos/pad_token_id`` and the special ``added_tokens`` of
    ``tokenizer.json`` when present.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text("utf-8"))
    text_config = config.get("text_config") or {}
    vocab_size = config.get("vocab_size") or text_config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{model_dir / 'config.json'}: vocab_size missing or invalid ({vocab_size!r})")
    special: set[int] = set()
    for cfg in (config, text_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            special |= _special_ids(cfg.get(key))
    tokenizer_json = model_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        added = json.loads(tokenizer_json.read_text("utf-8")).get("added_tokens") or []
        special |= {t["id"] for t in added if t.get("special") and isinstance(t.get("id"), int)}
    ids = [i for i in range(vocab_size) if i not in special]
    if not ids:
        raise ValueError(f"{model_dir}: no non-special token id below vocab_size={vocab_size}")
    return ids


def prompt_token_ids(n_tokens: int, vocabulary: Sequence[int], seed: int) -> list[int]:
    """``n_tokens`` ids drawn from ``vocabulary`` with a private RNG seeded by ``seed``."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens!r}")
    if not vocabulary:
        raise ValueError("vocabulary must not be empty")
    rng = random.Random(seed)
    return [vocabulary[rng.randrange(len(vocabulary))] for _ in range(n_tokens)]


def make_traceparent(rng: random.Random | None = None) -> tuple[str, str]:
    """A sampled W3C ``traceparent`` and its trace id (32 lower-case hex digits)."""
    if rng is None:
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    else:
        trace_id, span_id = f"{rng.getrandbits(128):032x}", f"{rng.getrandbits(64):016x}"
    # All-zero ids are invalid in W3C trace context.
    if int(trace_id, 16) == 0 or int(span_id, 16) == 0:
        return make_traceparent(rng)
    return f"00-{trace_id}-{span_id}-01", trace_id


# --- HTTP client ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionResult:
    """One ``/v1/completions`` call as the client saw it."""

    index: int
    status: int  # 0 when no HTTP answer came back
    latency_s: float
    sent_at_s: float  # after the replay started
    trace_id: str | None = None
    response_id: str | None = None
    prompt_tokens: int | None = None  # from the response's usage
    completion_tokens: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # x-llmco2-* only, lower-case
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def post_completion(
    base_url: str,
    body: Mapping[str, Any],
    *,
    index: int = 0,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
    connection: http.client.HTTPConnection | None = None,
    sent_at_s: float = 0.0,
    trace_id: str | None = None,
) -> CompletionResult:
    """POST ``body`` to ``/v1/completions``; never raises for HTTP or socket errors.

    Pass a ``connection`` to reuse it (keep-alive); otherwise one is opened and closed.
    """
    url = urllib.parse.urlsplit(base_url)
    own = connection is None
    conn = connection or http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
    payload = json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=payload, headers=all_headers)
        response = conn.getresponse()
        raw = response.read()
        latency_s = time.perf_counter() - t0
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        return CompletionResult(index, 0, time.perf_counter() - t0, sent_at_s, trace_id, error=f"{type(e).__name__}: {e}")
    finally:
        if own:
            conn.close()
    llmco2_headers = {k.lower(): v for k, v in response.getheaders() if k.lower().startswith("x-llmco2-")}
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if response.status != 200 or not isinstance(parsed, dict):
        return CompletionResult(
            index, response.status, latency_s, sent_at_s, trace_id, headers=llmco2_headers,
            error=raw[:300].decode("utf-8", "replace"),
        )
    usage = parsed.get("usage") or {}
    return CompletionResult(
        index,
        response.status,
        latency_s,
        sent_at_s,
        trace_id,
        response_id=parsed.get("id"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        headers=llmco2_headers,
    )


def completion_body(model: str, request: ScaledRequest, vocabulary: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """The ``/v1/completions`` body of a scaled request (token-id prompt, exact length)."""
    return {
        "model": model,
        "prompt": prompt_token_ids(request.prompt_tokens, vocabulary, seed=seed * 100_003 + request.index),
        "max_tokens": request.max_tokens,
        "ignore_eos": True,  # generate exactly max_tokens, as the trace did
        "temperature": 0.0,
    }


def replay(
    base_url: str,
    model: str,
    requests: Sequence[ScaledRequest],
    vocabulary: Sequence[int],
    *,
    seed: int = 0,
    timeout_s: float = 300.0,
) -> list[CompletionResult]:
    """Send each request at its ``send_at_s`` (one thread each), with its own traceparent."""
    rng = random.Random(seed)
    prepared = []
    for r in requests:
        traceparent, trace_id = make_traceparent(rng)
        prepared.append((r, completion_body(model, r, vocabulary, seed), traceparent, trace_id))
    results: list[CompletionResult | None] = [None] * len(prepared)
    t0 = time.perf_counter()

    def send(slot: int) -> None:
        r, body, traceparent, trace_id = prepared[slot]
        delay = t0 + r.send_at_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        results[slot] = post_completion(
            base_url, body, index=r.index, headers={"traceparent": traceparent}, timeout_s=timeout_s,
            sent_at_s=time.perf_counter() - t0, trace_id=trace_id,
        )

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(prepared))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


# --- spans -> table --------------------------------------------------------------------------------


def llm_request_spans_by_trace_id(spans: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """vLLM's ``llm_request`` spans keyed by trace id (the last one wins)."""
    return {s["trace_id"]: s for s in spans if s.get("name") == SPAN_NAME}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def build_table_rows(
    requests: Sequence[ScaledRequest],
    results: Sequence[CompletionResult],
    spans_by_trace_id: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One dict per request joining the trace row, the client's result and the span.

    Numbers stay numbers; a value the plugin did not provide is ``None``.
    """
    by_index = {r.index: r for r in results}
    rows = []
    for req in requests:
        res = by_index.get(req.index)
        span = spans_by_trace_id.get(res.trace_id) if res is not None and res.trace_id else None
        attrs: Mapping[str, Any] = span["attributes"] if span else {}
        headers = res.headers if res is not None else {}
        source = attrs.get(ATTR_MEAS_SOURCE)
        rows.append(
            {
                "index": req.index,
                "trace": req.source.trace,
                "trace_row": req.source.row,
                "trace_context_tokens": req.source.context_tokens,
                "trace_generated_tokens": req.source.generated_tokens,
                "send_at_s": req.send_at_s,
                "status": res.status if res is not None else None,
                "error": res.error if res is not None else "not sent",
                "request_id": attrs.get("gen_ai.request.id") or (res.response_id if res else None),
                "trace_id": res.trace_id if res is not None else None,
                "latency_s": res.latency_s if res is not None else None,
                "prompt_tokens": (res.prompt_tokens if res and res.prompt_tokens is not None
                                  else _int(attrs.get("gen_ai.usage.prompt_tokens"))),
                "gen_tokens": (res.completion_tokens if res and res.completion_tokens is not None
                               else _int(attrs.get("gen_ai.usage.completion_tokens"))),
                "span_found": span is not None,
                "pred_prefill_energy_j": _number(attrs.get(ATTR_PRED_PREFILL_J)),
                "pred_decode_energy_j": _number(attrs.get(ATTR_PRED_DECODE_J)),
                "pred_energy_j": _number(attrs.get(ATTR_PRED_J)),
                "pred_co2_g": _number(attrs.get(ATTR_PRED_CO2_G)),
                "pred_gen_tokens": _number(attrs.get(ATTR_PRED_GEN)),
                "meas_prefill_energy_j": _number(attrs.get(ATTR_MEAS_PREFILL_J)),
                "meas_decode_energy_j": _number(attrs.get(ATTR_MEAS_DECODE_J)),
                "meas_energy_j": _number(attrs.get(ATTR_MEAS_J)),
                "meas_uncertainty_j": _number(attrs.get(ATTR_MEAS_UNC_J)),
                "meas_source": str(source) if source is not None else None,
                "meas_co2_g": _number(attrs.get(ATTR_MEAS_CO2_G)),
                "header_pred_energy_j": _number(headers.get(HEADER_PRED_J)),
                "header_pred_co2_g": _number(headers.get(HEADER_PRED_CO2_G)),
            }
        )
    return rows


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None or not math.isfinite(number) else int(number)


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _fmt_measured(energy_j: float | None, uncertainty_j: float | None) -> str:
    if energy_j is None:
        return MISSING
    if uncertainty_j is None:
        return _fmt(energy_j)
    return f"{_fmt(energy_j)} ± {_fmt(uncertainty_j, '.2g')}"


_COLUMNS: tuple[tuple[str, str], ...] = (
    # (header, alignment)
    ("req", ">"),
    ("trace:row", "<"),
    ("prompt", ">"),
    ("gen", ">"),
    ("pred prefill J", ">"),
    ("pred decode J", ">"),
    ("pred J", ">"),
    ("pred gen", ">"),
    ("pred CO2 g", ">"),
    ("hdr pred J", ">"),
    ("meas J ± unc", ">"),
    ("source", "<"),
    ("meas CO2 g", ">"),
)


def _cells(row: Mapping[str, Any]) -> list[str]:
    if row.get("error") and not row.get("span_found"):
        return [str(row["index"]), f"{row['trace']}:{row['trace_row']}", MISSING, MISSING,
                f"error: {str(row['error'])[:60]}", "", "", "", "", "", "", "", ""]
    return [
        str(row["index"]),
        f"{row['trace']}:{row['trace_row']}",
        _fmt(row["prompt_tokens"], "d") if row["prompt_tokens"] is not None else MISSING,
        _fmt(row["gen_tokens"], "d") if row["gen_tokens"] is not None else MISSING,
        _fmt(row["pred_prefill_energy_j"]),
        _fmt(row["pred_decode_energy_j"]),
        _fmt(row["pred_energy_j"]),
        _fmt(row["pred_gen_tokens"], ".0f"),
        _fmt(row["pred_co2_g"], ".3g"),
        _fmt(row["header_pred_energy_j"]),
        _fmt_measured(row["meas_energy_j"], row["meas_uncertainty_j"]),
        row["meas_source"] or MISSING,
        _fmt(row["meas_co2_g"], ".3g"),
    ]


def _sum(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return math.fsum(values) if values else None


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of :func:`build_table_rows` output, with a totals line."""
    body = [_cells(r) for r in rows]
    total = [
        "all", "", _fmt(_sum(rows, "prompt_tokens"), ".0f"), _fmt(_sum(rows, "gen_tokens"), ".0f"),
        _fmt(_sum(rows, "pred_prefill_energy_j")), _fmt(_sum(rows, "pred_decode_energy_j")),
        _fmt(_sum(rows, "pred_energy_j")), _fmt(_sum(rows, "pred_gen_tokens"), ".0f"),
        _fmt(_sum(rows, "pred_co2_g"), ".3g"), _fmt(_sum(rows, "header_pred_energy_j")),
        _fmt(_sum(rows, "meas_energy_j")), "", _fmt(_sum(rows, "meas_co2_g"), ".3g"),
    ]
    headers = [h for h, _ in _COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in [*body, total])) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(format(c, f"{align}{w}") for c, (_, align), w in zip(cells, _COLUMNS, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(c) for c in body), rule, line(total)])


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write :func:`build_table_rows` output; ``None`` becomes an empty cell."""
    if not rows:
        Path(path).write_text("", encoding="utf-8")
        return
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _context_summary(spans_by_trace_id: Mapping[str, Mapping[str, Any]]) -> str | None:
    for span in spans_by_trace_id.values():
        attrs = span["attributes"]
        keys = [k for k in sorted(attrs) if k.startswith("llmco2.") and not k.startswith(("llmco2.predicted.", "llmco2.measured."))]
        if keys:
            return ", ".join(f"{k}={attrs[k]}" for k in keys)
    return None


# --- command line ---------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None, cpu: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llmco2_serve.devtools.demo",
        description="Replay an Azure trace slice against vLLM with the llmco2 plugin; print predicted vs measured energy and CO2 per request.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model folder or name to serve (default: build a tiny random-weight model)")
    src.add_argument("--family", default="llama", help="tiny model family to build when --model is not given (default llama)")
    p.add_argument("--requests", type=int, default=12, help="number of trace rows to replay (default 12)")
    p.add_argument("--trace", choices=TRACES, default="conv", help="which Azure trace (default conv)")
    p.add_argument("--start", type=int, default=0, help="first row of the slice to replay (default 0)")
    p.add_argument("--out", type=Path, default=Path("llmco2-demo"), help="output folder (default ./llmco2-demo)")
    p.add_argument("--speedup", type=float, default=2.0, help="replay arrivals this many times faster than the trace (default 2)")
    p.add_argument("--max-model-len", type=int, default=512 if cpu else 8192)
    p.add_argument("--prompt-scale", type=float, default=1 / 16 if cpu else 1.0,
                   help="prompt tokens = trace context tokens x this (default 1/16 on CPU, 1 on GPU)")
    p.add_argument("--max-gen-tokens", type=int, default=128 if cpu else 1024,
                   help="cap on the trace's generated tokens (default 128 on CPU, 1024 on GPU)")
    p.add_argument("--energy-reader", choices=("auto", "nvml", "cpu-estimate", "off"),
                   default="cpu-estimate" if cpu else "auto",
                   help="LLMCO2_ENERGY_READER for the server (default: NVML on a GPU; on CPU the codecarbon "
                        "CPU estimate, labelled as an estimate)")
    p.add_argument("--no-plugin", action="store_true", help="run with the llmco2 plugin switched off (for comparison)")
    p.add_argument("--span-timeout-s", type=float, default=30.0, help="how long to wait for the spans after the last response")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the vLLM server (repeatable), e.g. --server-arg=--tensor-parallel-size=2")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error(f"--requests must be >= 1, got {args.requests}")
    return args


def _on_sigterm(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so the with-blocks stop the server and the receiver.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    from llmco2_serve.devtools import serverctl
    from llmco2_serve.devtools.otlp_receiver import OtlpReceiver

    cpu = serverctl.is_cpu_build()
    args = _parse_args(argv, cpu)
    signal.signal(signal.SIGTERM, _on_sigterm)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    trace_rows = load_trace_slice(args.trace)[args.start : args.start + args.requests]
    if len(trace_rows) < args.requests:
        print(f"note: the {args.trace} slice has only {len(trace_rows)} rows from --start {args.start}", file=sys.stderr)
    if not trace_rows:
        print("error: no trace rows to replay", file=sys.stderr)
        return 2
    requests = scale_requests(trace_rows, max_model_len=args.max_model_len, prompt_scale=args.prompt_scale,
                              max_gen_tokens=args.max_gen_tokens, speedup=args.speedup)

    if args.model:
        model_dir = args.model
    else:
        from llmco2_serve.devtools.tinymodel import build_tiny_model

        print(f"building tiny random-weight {args.family} model in {out / ('model-' + args.family)} ...", flush=True)
        model_dir = str(build_tiny_model(out / f"model-{args.family}", args.family))
    if not (Path(model_dir) / "config.json").is_file():
        print(f"error: --model needs a local model folder with config.json (for the vocabulary), got {model_dir}", file=sys.stderr)
        return 2
    vocabulary = usable_token_ids(model_dir)

    spans_path = out / "spans.jsonl"
    spans_path.unlink(missing_ok=True)
    log_path = out / "vllm-server.log"
    env = {
        **serverctl.default_server_env(cpu=cpu),
        **serverctl.plugin_env(not args.no_plugin),
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    if args.energy_reader:
        env["LLMCO2_ENERGY_READER"] = args.energy_reader
    with OtlpReceiver(jsonl_path=spans_path) as receiver:
        extra = [*serverctl.default_engine_args(max_model_len=args.max_model_len, cpu=cpu),
                 "--otlp-traces-endpoint", receiver.traces_endpoint, *args.server_arg]
        server = serverctl.VllmServer(model_dir, env=env, extra_args=extra, log_path=log_path)
        print(f"starting vLLM ({server.launcher.kind} launcher, plugin {'off' if args.no_plugin else 'on'}) "
              f"on {server.base_url}; log: {log_path}", flush=True)
        with server:
            print(f"server ready in {server.startup_time_s:.1f} s; replaying {len(requests)} requests of the "
                  f"{args.trace} trace ({args.speedup:g}x faster than recorded) ...", flush=True)
            model_name = server.served_model()
            t0 = time.perf_counter()
            results = replay(server.base_url, model_name, requests, vocabulary, seed=args.seed)
            wall_s = time.perf_counter() - t0
            n_ok = sum(r.ok for r in results)
            wanted = {r.trace_id for r in results if r.ok}
            if wanted:
                try:
                    receiver.wait_for_spans(lambda s: s["name"] == SPAN_NAME and s["trace_id"] in wanted,
                                            timeout_s=args.span_timeout_s, count=len(wanted))
                except TimeoutError as e:
                    print(f"warning: {e}", file=sys.stderr)
        spans = llm_request_spans_by_trace_id(receiver.spans(SPAN_NAME))

    rows = build_table_rows(requests, results, spans)
    print()
    print(format_table(rows))
    print()
    print(f"{n_ok}/{len(requests)} requests succeeded in {wall_s:.2f} s; "
          f"{sum(r['span_found'] for r in rows)} llm_request spans matched by trace id")
    sources = Counter(r["meas_source"] for r in rows if r["meas_source"] is not None)
    if sources:
        print("measured energy source: " + ", ".join(f"{name} x{n}" for name, n in sorted(sources.items()))
              + ("  ('unavailable': no NVML energy counter on this machine)" if "unavailable" in sources else ""))
    context = _context_summary(spans)
    if context:
        print(f"plugin context: {context}")
    elif not args.no_plugin:
        print("note: the spans carry no llmco2.* attributes (is the plugin installed and enabled?); missing values print '-'")
    csv_path = out / "requests.csv"
    write_csv(rows, csv_path)
    print(f"spans: {spans_path.resolve()}")
    print(f"table: {csv_path.resolve()}")
    print(f"server log: {log_path.resolve()}")
    _write_report(spans_path, out)
    return 0 if n_ok == len(requests) else 1


def _write_report(spans_path: Path, out: Path) -> None:
    """The demo ends with ``llmco2 report`` on its spans (HTML + PNG); a missing matplotlib or a
    run without llmco2 spans is a note, not a failed demo."""
    from llmco2_serve.reporting.report import ReportError, write_report

    try:
        written = write_report(spans_path, out / "report.html", out / "report.png",
                               title="llmco2 demo: predicted vs measured")
    except ReportError as e:
        print(f"note: no report: {e}", file=sys.stderr)
        return
    print(f"report: {written['html']}  (image: {written['png']})")


if __name__ == "__main__":
    sys.exit(main())
