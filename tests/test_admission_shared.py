"""Tenant budgets shared by several OS processes (vLLM's --api-server-count > 1): SharedBudgetLedger.

Real processes (multiprocessing, spawn as vLLM starts its API servers), one SQLite file. The truth
is the test's own bookkeeping: integer nanogram amounts it chose, which requests each process says
it admitted, and the limit; the same workload on per-process ledgers (today's behaviour without
shared mode) must overspend, so the check can fail.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import random
import sqlite3

import pytest

from llmco2_serve.admission import AdmissionController, BudgetLedger, SharedBudgetLedger, parse_config
from llmco2_serve.admission.config import Window

NG = 1_000_000_000
LIMIT_NG = 2 * NG  # 2 g per hour for the one tenant every process spends from
PROCS, PER_PROC = 4, 50  # 200 requests in all
IN_FLIGHT = 6  # each process keeps this many reservations open before settling the oldest


def _amounts(wid: int) -> tuple[list[int], list[int]]:
    rng = random.Random(1000 + wid)
    reserve = [rng.randint(20_000_000, 90_000_000) for _ in range(PER_PROC)]  # 0.02-0.09 g upper bounds
    measured = [rng.randint(r // 4, r) for r in reserve]  # the final value is at most the reservation
    return reserve, measured


def _worker(path: str | None, wid: int, start, out) -> None:
    windows = lambda t: (Window(3600.0, LIMIT_NG / NG),)  # noqa: E731
    led = (SharedBudgetLedger(path, windows, retention_s=3600) if path
           else BudgetLedger(None, windows, retention_s=3600))  # per-process: each its own view
    reserve, measured = _amounts(wid)
    start.wait(60)
    admitted: list[int] = []
    open_: collections.deque[int] = collections.deque()

    def finish(j: int) -> None:
        rid = f"w{wid}-{j}"
        assert led.end(rid, None, 60.0)  # ended; waits for its measured value
        assert led.settle(rid, measured[j] / NG)

    for i in range(PER_PROC):
        if led.try_reserve("team", f"w{wid}-{i}", reserve[i] / NG, reserve[i] / NG / 3) is None:
            admitted.append(i)
            open_.append(i)
        if len(open_) > IN_FLIGHT:
            finish(open_.popleft())
    while open_:
        finish(open_.popleft())
    synced = getattr(led, "synced_rows", 0)
    spent_ng = round(led.spent_g("team", 3600.0) * NG)
    led.close()
    out.put((wid, admitted, synced, spent_ng))


def _run(path: str | None) -> tuple[dict[int, list[int]], dict[int, int], dict[int, int]]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(PROCS), ctx.Queue()  # all open their ledger, then all start at once
    procs = [ctx.Process(target=_worker, args=(path, w, start, out)) for w in range(PROCS)]
    for p in procs:
        p.start()
    res = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return ({w: a for w, a, _, _ in res}, {w: s for w, _, s, _ in res}, {w: sp for w, _, _, sp in res})


def test_processes_share_one_budget_exactly(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    admitted, synced, _ = _run(path)
    settled = sum(_amounts(w)[1][i] for w, ids in admitted.items() for i in ids)
    max_reservation = max(max(_amounts(w)[0]) for w in range(PROCS))
    n_admitted = sum(len(a) for a in admitted.values())
    assert 0 < n_admitted < PROCS * PER_PROC, "the budget must run out for the test to mean anything"
    assert sum(synced.values()) > 0, "the processes' transactions must have interleaved"
    # Never over the budget: every settled value is <= its reservation, and a reservation was only
    # admitted when it fitted with everything reserved or settled before it (the bound is
    # one reservation more).
    assert settled <= LIMIT_NG
    assert settled <= LIMIT_NG + max_reservation
    db = sqlite3.connect(path)
    n, total_ng, open_ = db.execute("SELECT COUNT(*), SUM(amount_ng), SUM(state != 'settled') FROM ledger").fetchone()
    assert (n, open_) == (n_admitted, 0)
    assert total_ng == settled  # exact: the settled sum is what the store says
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # A process opened afterwards reads the same spend.
    led = SharedBudgetLedger(path, lambda t: (Window(3600.0, LIMIT_NG / NG),), retention_s=3600)
    assert round(led.spent_g("team", 3600) * NG) == settled
    led.close()


def test_per_process_ledgers_overspend_the_same_workload():
    """The control: without shared mode each process admits up to the whole budget."""
    admitted, _, spent = _run(None)
    settled = sum(_amounts(w)[1][i] for w, ids in admitted.items() for i in ids)
    max_reservation = max(max(_amounts(w)[0]) for w in range(PROCS))
    assert settled > LIMIT_NG + max_reservation
    assert all(sp <= LIMIT_NG for sp in spent.values())  # each one's own view was within the limit


def _reserve_then(path: str, rid: str, die: bool, ready, release) -> None:
    led = SharedBudgetLedger(path, lambda t: (Window(3600.0, 1.0),), retention_s=3600)
    assert led.try_reserve("team", rid, 0.4, 0.1) is None
    ready.set()
    if die:
        os._exit(0)  # a crashed API server: no close, the reservation stays open in the store
    release.wait(60)
    led.close()


def test_open_reservations_of_a_dead_process_are_orphaned_not_those_of_a_live_one(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = mp.get_context("spawn")
    release = ctx.Event()
    ready_live, ready_dead = ctx.Event(), ctx.Event()
    live = ctx.Process(target=_reserve_then, args=(path, "live", False, ready_live, release))
    dead = ctx.Process(target=_reserve_then, args=(path, "dead", True, ready_dead, release))
    live.start()
    assert ready_live.wait(60)
    dead.start()
    assert ready_dead.wait(60)
    dead.join(30)
    try:
        led = SharedBudgetLedger(path, lambda t: (Window(3600.0, 1.0),), retention_s=3600)
        assert led.entry("dead").source == "orphaned" and led.entry("dead").amount_g == pytest.approx(0.1)
        assert led.entry("live").state == "reserved" and led.entry("live").amount_g == pytest.approx(0.4)
        assert led.spent_g("team", 3600) == pytest.approx(0.5)
        assert led.try_reserve("team", "next", 0.6, 0.1) is not None  # 0.5 + 0.6 > 1
        assert led.try_reserve("team", "next", 0.5, 0.1) is None
        led.close()
    finally:
        release.set()
        live.join(30)


def test_mode_follows_the_api_server_count(tmp_path, monkeypatch):
    from llmco2_serve.hooks.admission import api_server_processes

    assert api_server_processes(argparse.Namespace(api_server_count=4)) == 4
    assert api_server_processes(argparse.Namespace(api_server_count=None)) == 1  # vLLM's single-server path
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    doc = {"budgets": {"default": {"per_hour_co2_g": 1.0}}}
    ctl = AdmissionController(parse_config(doc), processes=2)
    assert isinstance(ctl.ledger, SharedBudgetLedger)
    assert os.path.dirname(ctl.ledger.path) == str(tmp_path)  # memory-only budgets: a per-run file
    ctl.close()
    one = AdmissionController(parse_config(doc), processes=1)
    assert type(one.ledger) is BudgetLedger and one.ledger.path is None  # the fast path, unchanged
    one.close()
    forced = AdmissionController(parse_config({"budgets": {**doc["budgets"], "shared": False}}), processes=2)
    assert type(forced.ledger) is BudgetLedger
    forced.close()
    store = str(tmp_path / "s.sqlite")
    on = AdmissionController(parse_config({"budgets": {**doc["budgets"], "store": store, "shared": True}}))
    assert isinstance(on.ledger, SharedBudgetLedger) and on.ledger.path == store
    on.close()
    with pytest.raises(Exception, match="budgets.shared"):
        parse_config({"budgets": {"shared": "yes"}}, "t")


def test_a_failed_transaction_is_a_store_error_and_the_next_one_starts_from_the_store(tmp_path):
    from llmco2_serve.admission import StoreError

    path = str(tmp_path / "shared.sqlite")
    led = SharedBudgetLedger(path, lambda t: (Window(3600.0, 1.0),), retention_s=3600, busy_timeout_s=0.05)
    assert led.try_reserve("t", "a", 0.3, 0.1) is None
    other = sqlite3.connect(path, isolation_level=None)  # someone else holds SQLite's write lock
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        led.try_reserve("t", "b", 0.3, 0.1)
    other.execute("ROLLBACK")
    other.close()
    assert led.write_failures == 1
    assert led.spent_g("t", 3600) == pytest.approx(0.3)  # b never reached the store: not counted
    assert led.entry("b") is None
    assert led.try_reserve("t", "c", 0.7, 0.1) is None  # 0.3 + 0.7 fits exactly
    assert led.try_reserve("t", "d", 0.01, 0.01) is not None
    led.close()


def test_a_shared_store_that_cannot_be_opened_fails_open(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ctl = AdmissionController(parse_config({"budgets": {"store": str(blocker / "s.sqlite"), "shared": True,
                                                        "default": {"per_hour_co2_g": 0.001}}}))
    assert ctl.ledger is None and "shared budget store" in ctl.store_error
    from llmco2_serve.admission import AdmissionRequest, Predicted

    d = ctl.decide(AdmissionRequest("r", "t", Predicted(0.1, 1.0, 1.0, 10.0, 100)))
    assert d.admitted and d.reason == "store_error"


def test_the_api_server_hook_shares_the_budget_when_vllm_runs_several(tmp_path):
    """hooks/admission.setup with the args vLLM gives each API-server process (N > 1, and None on
    its single-server path)."""
    from llmco2_serve.hooks import _state
    from llmco2_serve.hooks import admission as hook
    from llmco2_serve.runtime.settings import load_settings

    conf = tmp_path / "adm.toml"
    conf.write_text('[budgets]\nstore = "%s"\n[budgets.default]\nper_hour_co2_g = 1.0\n' % (tmp_path / "s.sqlite"))
    settings = load_settings({"LLMCO2_PAIRS_PATH": "", "LLMCO2_ADMISSION_CONFIG": str(conf), "LLMCO2_PROMETHEUS": "0"})
    st = _state.state()
    saved = (st.active, st.settings, dict(st.extra))
    try:
        st.active, st.settings = True, settings
        kinds = {}
        for n in (3, None):
            st.extra.pop("admission", None)
            adm = hook.setup(settings, argparse.Namespace(api_server_count=n, scheduling_policy="fcfs"))
            kinds[n] = type(adm.controller.ledger)
            adm.close()
        assert kinds == {3: SharedBudgetLedger, None: BudgetLedger}
    finally:
        st.active, st.settings = saved[0], saved[1]
        st.extra.clear()
        st.extra.update(saved[2])
