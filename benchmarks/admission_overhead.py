"""Admission decision cost per request, including the budget store (issue 9 target: <= 0.2 ms p99).

One request's admission work on the hot path, as the plugin does it: ``AdmissionController.decide``
(request cap with ``max_tokens`` lowering for the requests over it, the tenant's three rolling windows
checked and the upper bound reserved in the in-memory ledger, priority) plus, at its end, ``end``
and the settlement of its measured value; the SQLite WAL store is written by the ledger's
background thread meanwhile (its batches are timed too). Tenants are drawn from ``--tenants``;
the ledger is pre-filled with ``--prefill`` settled entries spread over the past day (so the day
window holds them all), then requests arrive at 100/s across the tenants (some are over a budget).

Run: python benchmarks/admission_overhead.py [--n 20000] [--tenants 50] [--prefill 100000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import numpy as np

from llmco2_serve.admission import AdmissionController, AdmissionRequest, Predicted, parse_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--prefill", type=int, default=100000, help="ledger entries written before timing")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="llmco2-adm-bench-")
    store = os.path.join(tmp, "ledger.sqlite")
    cfg = parse_config({
        "request_cap": {"co2_g": 0.9, "action": "lower_max_tokens"},
        "budgets": {"store": store, "default": {"per_minute_co2_g": 15.0, "per_hour_co2_g": 2000.0,
                                                 "per_day_co2_g": 40000.0}},
        "priority": {"by": "carbon", "co2_g_thresholds": [0.05, 0.2, 0.5]},
    }, "bench")
    now = [time.time() - 86400.0]  # the ledger's clock: pre-fill spread over the last day, then 100 requests/s
    ctl = AdmissionController(cfg, clock=lambda: now[0])
    rng = random.Random(0)
    tenants = [f"team-{i}" for i in range(args.tenants)]

    def predicted(max_tokens: int) -> Predicted:
        # a stand-in predictor's shape (0.1 g prefill + 1 mg per token); its cost is not what is timed
        up = 0.1 + 0.001 * max_tokens
        return Predicted(0.1 + 0.0003 * max_tokens, up, 400 + 3 * max_tokens, 400 + 10 * max_tokens, max_tokens)

    # pre-fill: settled history inside the windows
    t0 = time.perf_counter()
    for i in range(args.prefill):
        now[0] += 86400.0 / args.prefill
        rid = f"pre-{i}"
        ctl.decide(AdmissionRequest(rid, rng.choice(tenants), predicted(rng.randint(16, 512))))
        ctl.ledger.settle(rid, rng.uniform(0.0, 0.3))
    ctl.ledger.flush()
    prefill_s = time.perf_counter() - t0
    decide_us, end_us = [], []
    decisions: dict[str, int] = {}
    for i in range(args.n):
        rid = f"r-{i}"
        now[0] += 0.01
        mt = rng.choice([64, 256, 512, 1024, 2048])
        req = AdmissionRequest(rid, rng.choice(tenants), predicted(mt), what_if=predicted)
        a = time.perf_counter_ns()
        d = ctl.decide(req)
        b = time.perf_counter_ns()
        decide_us.append((b - a) / 1000)
        decisions[d.decision] = decisions.get(d.decision, 0) + 1
        if d.admitted:
            a = time.perf_counter_ns()
            ctl.finished(rid)
            ctl.measured(rid, rng.uniform(0.0, 0.3))
            end_us.append((time.perf_counter_ns() - a) / 1000)
    t = time.perf_counter_ns()
    flushed = ctl.ledger.flush()
    flush_ms = (time.perf_counter_ns() - t) / 1e6
    ctl.close()
    d_arr, e_arr = np.array(decide_us), np.array(end_us)
    out = {
        "n": args.n, "tenants": args.tenants, "prefill_entries": args.prefill, "prefill_s": round(prefill_s, 2),
        "decide_us": {"p50": float(np.percentile(d_arr, 50)), "p99": float(np.percentile(d_arr, 99)),
                      "max": float(d_arr.max()), "mean": float(d_arr.mean())},
        "end_and_settle_us": {"p50": float(np.percentile(e_arr, 50)), "p99": float(np.percentile(e_arr, 99)),
                              "max": float(e_arr.max())},
        "decisions": decisions, "last_flush_rows": flushed, "last_flush_ms": round(flush_ms, 3),
        "store_bytes": os.path.getsize(store) + (os.path.getsize(store + "-wal") if os.path.exists(store + "-wal") else 0),
        "store_write_failures": 0 if ctl.ledger is None else ctl.ledger.write_failures,
    }
    print(f"admission decide (cap + lowering + 3-window budget reserve + priority), n={args.n}, "
          f"{args.tenants} tenants, {args.prefill} ledger entries:")
    print(f"  decide  p50 {out['decide_us']['p50']:.1f} us  p99 {out['decide_us']['p99']:.1f} us  "
          f"max {out['decide_us']['max']:.0f} us  (target p99 <= 200 us)")
    print(f"  end+settle p50 {out['end_and_settle_us']['p50']:.1f} us  p99 {out['end_and_settle_us']['p99']:.1f} us")
    print(f"  decisions {decisions}; SQLite WAL store {out['store_bytes'] / 1e6:.1f} MB, written in the background")
    print(f"  (median of per-request decide: {statistics.median(decide_us):.1f} us)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
