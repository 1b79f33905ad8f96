"""The demo's pure parts: trace slice, scaling, prompts, client, and the span table.

No vLLM here: the client runs against a small in-process HTTP server, and the table is
built from synthetic span dicts shaped like the OTLP receiver's.
"""

from __future__ import annotations

import csv
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmco2_serve.devtools.demo import (
    HEADER_PRED_CO2_G,
    HEADER_PRED_J,
    MISSING,
    CompletionResult,
    ScaledRequest,
    TraceRequest,
    build_table_rows,
    completion_body,
    format_table,
    llm_request_spans_by_trace_id,
    load_trace_slice,
    make_traceparent,
    parse_trace_timestamp,
    post_completion,
    prompt_token_ids,
    replay,
    scale_requests,
    usable_token_ids,
    write_csv,
)

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "azure-llm-trace-2023"


# --- trace slice ----------------------------------------------------------------------------------------


def test_parse_trace_timestamp_keeps_the_100ns_fraction():
    # 2023-11-16 18:40:46 UTC = 1700160046 s since the epoch.
    assert parse_trace_timestamp("2023-11-16 18:40:46.1532920") == pytest.approx(1700160046.153292, abs=1e-7)
    assert parse_trace_timestamp("2023-11-16 18:40:46") == 1700160046.0
    later = parse_trace_timestamp("2023-11-16 18:40:46.1748350")
    assert later - parse_trace_timestamp("2023-11-16 18:40:46.1532920") == pytest.approx(0.0215430, abs=1e-6)
    for bad in ("2023-11-16T18:40:46", "18:40:46.1", "2023-11-16 18:40:46.12a"):
        with pytest.raises(ValueError, match="TIMESTAMP"):
            parse_trace_timestamp(bad)


def test_packaged_slice_has_300_consecutive_rows_per_trace():
    rows = load_trace_slice()
    assert len(rows) == 600
    for trace, first_row in (("code", 4409), ("conv", 9683)):
        part = load_trace_slice(trace)
        assert len(part) == 300
        assert [r.row for r in part] == list(range(first_row, first_row + 300))
        assert part[0].arrival_s == 0.0
        assert all(b.arrival_s >= a.arrival_s for a, b in zip(part, part[1:]))
    code = load_trace_slice("code")
    assert code[0] == TraceRequest("code", 4409, "2023-11-16 18:40:46.1532920", 0.0, 1710, 14)
    assert code[1].arrival_s == pytest.approx(0.021543, abs=1e-6)
    assert (code[1].context_tokens, code[1].generated_tokens) == (4623, 92)
    conv = load_trace_slice("conv")
    assert (conv[0].context_tokens, conv[0].generated_tokens) == (740, 83)
    # The slice spans 30.2 s of the code trace and 41.3 s of the conversation trace.
    assert code[-1].arrival_s == pytest.approx(30.2276340, abs=1e-6)
    assert conv[-1].arrival_s == pytest.approx(41.2991610, abs=1e-6)


def test_packaged_slice_matches_the_source_traces():
    if not SHARED_TRACES.is_dir():
        pytest.skip("shared Azure traces not available")
    for trace in ("code", "conv"):
        with (SHARED_TRACES / f"AzureLLMInferenceTrace_{trace}.csv").open() as f:
            source = list(csv.DictReader(f))
        for r in load_trace_slice(trace):
            src = source[r.row]
            assert (src["TIMESTAMP"], int(src["ContextTokens"]), int(src["GeneratedTokens"])) == (
                r.timestamp, r.context_tokens, r.generated_tokens)


def test_load_trace_slice_rejects_bad_trace_names_and_rows(tmp_path):
    with pytest.raises(ValueError, match="trace must be one of"):
        load_trace_slice("chat")
    bad = tmp_path / "bad.csv"
    bad.write_text("trace,row,TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "conv,0,2023-11-16 18:00:00.0000000,10,5\n"
                   "conv,1,2023-11-16 18:00:01.0000000,ten,5\n")
    with pytest.raises(ValueError, match="line 3"):
        load_trace_slice(path=bad)
    zero = tmp_path / "zero.csv"
    zero.write_text("trace,row,TIMESTAMP,ContextTokens,GeneratedTokens\nconv,0,2023-11-16 18:00:00,10,0\n")
    with pytest.raises(ValueError, match="line 2: token counts"):
        load_trace_slice(path=zero)


def test_arrival_is_relative_to_each_traces_first_row(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("trace,row,TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "code,7,2023-11-16 18:00:10.5000000,100,10\n"
                    "conv,3,2023-11-16 18:00:00.0000000,200,20\n"
                    "code,8,2023-11-16 18:00:12.0000000,300,30\n"
                    "conv,4,2023-11-16 18:00:00.2500000,400,40\n")
    assert [(r.trace, r.row, r.arrival_s) for r in load_trace_slice(path=path)] == [
        ("code", 7, 0.0), ("conv", 3, 0.0), ("code", 8, 1.5), ("conv", 4, 0.25),
    ]
    assert [r.row for r in load_trace_slice("conv", path=path)] == [3, 4]


# --- scaling and prompts -----------------------------------------------------------------------------


def _trace(ctx: int, gen: int, arrival_s: float, row: int = 0) -> TraceRequest:
    return TraceRequest("conv", row, "2023-11-16 18:00:00", arrival_s, ctx, gen)


def test_scale_requests_fits_the_model_hand_computed():
    rows = [_trace(1000, 200, 10.0), _trace(8000, 50, 11.0), _trace(3, 5, 13.0), _trace(744, 600, 10.5)]
    out = scale_requests(rows, max_model_len=512, prompt_scale=1 / 16, max_gen_tokens=128, speedup=2.0)
    # 1000/16 = 62.5 -> 62 (round half to even); 8000/16 = 500 -> 512 - 50 = 462;
    # 3/16 -> 0 -> at least 1; 744/16 = 46.5 -> 46. Generation capped at 128.
    assert [(r.prompt_tokens, r.max_tokens) for r in out] == [(62, 128), (462, 50), (1, 5), (46, 128)]
    # Arrivals relative to the first request, 2x faster; an earlier row is sent at once.
    assert [r.send_at_s for r in out] == [0.0, 0.5, 1.5, 0.25]
    assert [r.index for r in out] == [0, 1, 2, 3]
    assert all(r.prompt_tokens + r.max_tokens <= 512 for r in out)


def test_scale_requests_never_exceeds_the_context_even_for_long_generations():
    out = scale_requests([_trace(100, 5000, 0.0)], max_model_len=64, prompt_scale=1.0, max_gen_tokens=10_000)
    assert (out[0].prompt_tokens, out[0].max_tokens) == (1, 63)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_model_len": 1}, "max_model_len"),
    ({"prompt_scale": 0.0}, "prompt_scale"),
    ({"max_gen_tokens": 0}, "max_gen_tokens"),
    ({"speedup": -1.0}, "speedup"),
])
def test_scale_requests_validates(kwargs, field):
    args = {"max_model_len": 512, "prompt_scale": 1.0, "max_gen_tokens": 16, **kwargs}
    with pytest.raises(ValueError, match=field):
        scale_requests([_trace(10, 10, 0.0)], **args)


def _fake_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"vocab_size": 10, "bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0}))
    (model / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 9, "content": "<|im_end|>", "special": True},
        {"id": 8, "content": "word", "special": False},
    ]}))
    return model


def test_usable_token_ids_excludes_special_tokens(tmp_path):
    assert usable_token_ids(_fake_model(tmp_path)) == [3, 4, 5, 6, 8]


def test_usable_token_ids_reads_text_config_of_multimodal_models(tmp_path):
    model = tmp_path / "mm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 4, "eos_token_id": 3}}))
    assert usable_token_ids(model) == [0, 1, 2]
    (model / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(ValueError, match="vocab_size"):
        usable_token_ids(model)


def test_prompt_token_ids_is_deterministic_and_in_vocabulary():
    vocab = [3, 4, 5, 6, 8]
    a = prompt_token_ids(50, vocab, seed=1)
    assert len(a) == 50 and set(a) <= set(vocab)
    assert a == prompt_token_ids(50, vocab, seed=1)
    assert a != prompt_token_ids(50, vocab, seed=2)
    assert len(set(a)) > 1
    with pytest.raises(ValueError, match="n_tokens"):
        prompt_token_ids(0, vocab, seed=1)
    with pytest.raises(ValueError, match="vocabulary"):
        prompt_token_ids(3, [], seed=1)


def test_completion_body_has_exact_lengths():
    req = ScaledRequest(3, _trace(100, 20, 0.0), prompt_tokens=17, max_tokens=9, send_at_s=0.0)
    body = completion_body("m", req, [5, 6, 7], seed=4)
    assert body["model"] == "m" and body["max_tokens"] == 9 and body["ignore_eos"] is True
    assert len(body["prompt"]) == 17 and set(body["prompt"]) <= {5, 6, 7}
    assert body == completion_body("m", req, [5, 6, 7], seed=4)


def test_make_traceparent_is_w3c_and_reproducible():
    tp, tid = make_traceparent(random.Random(7))
    m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", tp)
    assert m is not None and m.group(1) == tid
    assert (tp, tid) == make_traceparent(random.Random(7))
    assert make_traceparent()[1] != make_traceparent()[1]


# --- HTTP client against a fake server -------------------------------------------------------------------


class _FakeCompletions(BaseHTTPRequestHandler):
    seen: list[tuple[float, dict, dict]]

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((time.perf_counter(), dict(self.headers), body))  # type: ignore[attr-defined]
        if body.get("model") == "fail":
            payload, code = b'{"error": "no such model"}', 404
        else:
            payload = json.dumps({"id": f"cmpl-{len(self.server.seen)}", "usage": {  # type: ignore[attr-defined]
                "prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}}).encode()
            code = 200
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-LLMCO2-Predicted-Energy-J", "12.5")
        self.send_header("x-llmco2-predicted-co2-g", "0.004")
        self.send_header("x-other", "ignored")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    server.daemon_threads = True
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_post_completion_parses_usage_and_llmco2_headers(fake_server):
    base = f"http://127.0.0.1:{fake_server.server_address[1]}"
    res = post_completion(base, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}, index=5,
                          headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}, trace_id="a" * 32)
    assert res.ok and res.status == 200 and res.index == 5
    assert (res.response_id, res.prompt_tokens, res.completion_tokens) == ("cmpl-1", 3, 4)
    assert dict(res.headers) == {HEADER_PRED_J: "12.5", HEADER_PRED_CO2_G: "0.004"}
    assert fake_server.seen[0][1]["traceparent"] == "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    failed = post_completion(base, {"model": "fail", "prompt": [1], "max_tokens": 1})
    assert (failed.ok, failed.status) == (False, 404) and "no such model" in failed.error


def test_post_completion_reports_a_refused_connection_without_raising():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = post_completion(f"http://127.0.0.1:{port}", {"model": "m"}, timeout_s=2)
    assert res.status == 0 and not res.ok and "ConnectionRefusedError" in res.error


def test_replay_sends_each_request_on_time_with_its_own_traceparent(fake_server):
    base = f"http://127.0.0.1:{fake_server.server_address[1]}"
    reqs = [ScaledRequest(i, _trace(10, 3, 0.0, row=i), 4 + i, 2, send_at_s=t) for i, t in enumerate((0.0, 0.3, 0.15))]
    results = replay(base, "m", reqs, [5, 6], seed=3)
    assert [r.index for r in results] == [0, 1, 2] and all(r.ok for r in results)
    by_tp = {h["traceparent"]: (t, b) for t, h, b in fake_server.seen}
    assert len(by_tp) == 3
    for r, req in zip(results, reqs):
        tp = next(tp for tp in by_tp if tp.split("-")[1] == r.trace_id)
        _, body = by_tp[tp]
        assert len(body["prompt"]) == req.prompt_tokens and r.prompt_tokens == req.prompt_tokens
    t0 = min(t for t, _, _ in fake_server.seen)
    arrival = {len(b["prompt"]): t - t0 for t, _, b in fake_server.seen}
    assert arrival[5] == pytest.approx(0.3, abs=0.1) and arrival[6] == pytest.approx(0.15, abs=0.1)
    assert results[1].sent_at_s == pytest.approx(0.3, abs=0.1)


# --- spans -> table ---------------------------------------------------------------------------------------


def _span(trace_id: str, **attrs) -> dict:
    return {"name": "llm_request", "trace_id": trace_id, "span_id": "1" * 16, "attributes": attrs}


def _fixture_rows():
    reqs = [ScaledRequest(i, _trace(100 * (i + 1), 10, 0.0, row=40 + i), 6 + i, 10, 0.0) for i in range(3)]
    results = [
        CompletionResult(0, 200, 0.5, 0.0, "t0", "cmpl-a", 6, 10, {HEADER_PRED_J: "1.75", HEADER_PRED_CO2_G: "0.0007"}),
        CompletionResult(1, 200, 0.6, 0.1, "t1", "cmpl-b", 7, 10, {}),
        CompletionResult(2, 500, 0.1, 0.2, "t2", error="Internal Server Error"),
    ]
    spans = [
        _span("t0", **{
            "gen_ai.request.id": "cmpl-a-0",
            "llmco2.predicted.prefill_energy_j": 0.25, "llmco2.predicted.decode_energy_j": 1.5,
            "llmco2.predicted.energy_j": 1.75, "llmco2.predicted.co2_g": 0.0007,
            "llmco2.predicted.gen_tokens": 10,
            "llmco2.measured.energy_j": 2.0, "llmco2.measured.uncertainty_j": 0.25,
            "llmco2.measured.source": "nvml", "llmco2.measured.co2_g": 0.0008,
            "llmco2.gpu": "NVIDIA H100 80GB HBM3",
        }),
        _span("t1", **{"gen_ai.request.id": "cmpl-b-0", "llmco2.measured.source": "unavailable"}),
        {"name": "other", "trace_id": "t2", "attributes": {}},
    ]
    return reqs, results, spans


def test_llm_request_spans_by_trace_id_ignores_other_spans():
    _, _, spans = _fixture_rows()
    assert sorted(llm_request_spans_by_trace_id(spans)) == ["t0", "t1"]


def test_build_table_rows_joins_trace_result_and_span():
    reqs, results, spans = _fixture_rows()
    rows = build_table_rows(reqs, results, llm_request_spans_by_trace_id(spans))
    full, partial, failed = rows
    assert full["request_id"] == "cmpl-a-0" and full["trace_row"] == 40 and full["span_found"]
    assert (full["pred_prefill_energy_j"], full["pred_decode_energy_j"], full["pred_energy_j"]) == (0.25, 1.5, 1.75)
    assert (full["meas_energy_j"], full["meas_uncertainty_j"], full["meas_source"]) == (2.0, 0.25, "nvml")
    assert full["header_pred_energy_j"] == 1.75 and full["header_pred_co2_g"] == 0.0007
    assert partial["pred_energy_j"] is None and partial["meas_source"] == "unavailable"
    assert partial["header_pred_energy_j"] is None
    assert failed["span_found"] is False and failed["error"] == "Internal Server Error"


def test_format_table_prints_values_missing_dashes_errors_and_totals():
    reqs, results, spans = _fixture_rows()
    text = format_table(build_table_rows(reqs, results, llm_request_spans_by_trace_id(spans)))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["req", "trace:row", "prompt", "gen"]
    assert len(lines) == 7  # header, rule, 3 rows, rule, totals
    full = lines[2].split()
    assert full[:11] == ["0", "conv:40", "6", "10", "0.25", "1.5", "1.75", "10", "0.0007", "1.75", "2"]
    assert "2 ± 0.25" in lines[2] and full[-2:] == ["nvml", "0.0008"]
    partial = lines[3].split()
    assert partial[:4] == ["1", "conv:41", "7", "10"]
    assert partial[4:] == [MISSING] * 7 + ["unavailable", MISSING]
    assert "error: Internal Server Error" in lines[4]
    totals = lines[6].split()
    # Sums over the rows that have a value: prompts 6+7, generated 10+10.
    assert totals[:9] == ["all", "13", "20", "0.25", "1.5", "1.75", "10", "0.0007", "1.75"]


def test_format_table_columns_line_up():
    reqs, results, spans = _fixture_rows()
    lines = format_table(build_table_rows(reqs, results, llm_request_spans_by_trace_id(spans))).splitlines()
    header, rule = lines[0], lines[1]
    # Right-aligned numeric column "pred J" ends where its rule segment ends, in every data row.
    end = header.index("pred J") + len("pred J")
    assert rule[end - 1] == "-" and rule[end] == " "
    assert lines[2][:end].endswith("1.75") and lines[3][:end].endswith(MISSING)


def test_write_csv_round_trips_with_empty_cells_for_missing(tmp_path):
    reqs, results, spans = _fixture_rows()
    rows = build_table_rows(reqs, results, llm_request_spans_by_trace_id(spans))
    path = tmp_path / "requests.csv"
    write_csv(rows, path)
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert len(back) == 3 and list(back[0]) == list(rows[0])
    assert back[0]["pred_energy_j"] == "1.75" and back[0]["meas_source"] == "nvml"
    assert back[1]["pred_energy_j"] == "" and back[2]["status"] == "500"
