"""Admission decision cost per request, including the budget store (issue 9 target: <= 0.2 ms p99).

One request's admission work on the hot path, as the plugin does it: ``AdmissionController.decide``
(request cap with ``max_tokens`` lowering for the requests over it, the tenant's three rolling windows
checked and the upper bound reserved in the in-memory ledger, priority) plus, at its end, ``end``
and the settlement of its measured value; the SQLite WAL store is written by the ledger's
background thread meanwhile (its batches are timed too). Tenants are drawn from ``--tenants``;
the ledger is pre-filled with ``--prefill`` settled entries spread over the past day (so the day
window holds them all), then requests arrive at 100/s across the tenants (some are over a budget).

``--shared``: the budgets in the :class:`SharedBudgetLedger` that several API-server processes use
(``--api-server-count N > 1``): every reservation, end and settlement is one SQLite transaction on
the store (BEGIN IMMEDIATE under the store's flock), so the timed ``decide`` includes its commit.
``--contend K`` (with ``--shared``) starts K other processes that reserve/end/settle in the same
store at ``--contend-rate`` requests/s each meanwhile, as other API servers would.

Run: python benchmarks/admission_overhead.py [--n 20000] [--tenants 50] [--prefill 100000] [--in-situ 5000]
     [--shared [--contend K --contend-rate R]] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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
    ap.add_argument("--in-situ", type=int, default=5000, help="also time the API-server hook with a real "
                    "EnergyService (Llama-3.1-8B table) for this many requests; 0: skip")
    ap.add_argument("--shared", action="store_true", help="budgets shared by several processes (SQLite "
                    "transaction per operation), as with vLLM's --api-server-count > 1")
    ap.add_argument("--contend", type=int, default=0, help="with --shared: this many other processes "
                    "spending from the same store meanwhile")
    ap.add_argument("--contend-rate", type=float, default=100.0, help="requests/s of each contending process")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    if args.contend and not args.shared:
        ap.error("--contend needs --shared")
    tmp = tempfile.mkdtemp(prefix="llmco2-adm-bench-")
    store = os.path.join(tmp, "ledger.sqlite")
    cfg = parse_config(_doc(store, args.shared), "bench")
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
    contenders, stop = [], None
    if args.contend:
        sp = mp.get_context("spawn")
        stop, ready = sp.Event(), sp.Barrier(args.contend + 1)
        contenders = [sp.Process(target=_contend, args=(store, k, tenants, args.contend_rate, stop, ready))
                      for k in range(args.contend)]
        for p in contenders:
            p.start()
        ready.wait()
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
    contended = 0
    if stop is not None:
        stop.set()
        for p in contenders:
            p.join(60)
        contended = ctl.ledger.synced_rows
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
        "ledger": type(ctl.ledger).__name__, "contending_processes": args.contend,
        "rows_synced_from_other_processes": contended,
    }
    mode = ("shared store, one SQLite transaction per operation" if args.shared else "in-memory ledger, "
            "SQLite written in the background")
    if args.contend:
        mode += f"; {args.contend} other processes at {args.contend_rate:g} req/s each ({contended} of their rows synced)"
    print(f"admission decide (cap + lowering + 3-window budget reserve + priority), n={args.n}, "
          f"{args.tenants} tenants, {args.prefill} ledger entries, {mode}:")
    print(f"  decide  p50 {out['decide_us']['p50']:.1f} us  p99 {out['decide_us']['p99']:.1f} us  "
          f"max {out['decide_us']['max']:.0f} us  (target p99 <= 200 us)")
    print(f"  end+settle p50 {out['end_and_settle_us']['p50']:.1f} us  p99 {out['end_and_settle_us']['p99']:.1f} us")
    print(f"  decisions {decisions}; SQLite WAL store {out['store_bytes'] / 1e6:.1f} MB")
    print(f"  (median of per-request decide: {statistics.median(decide_us):.1f} us)")
    if args.in_situ:
        out["in_situ"] = in_situ(args.in_situ, tmp, args.shared)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def _doc(store: str, shared: bool) -> dict:
    return {
        "request_cap": {"co2_g": 0.9, "action": "lower_max_tokens"},
        "budgets": {"store": store, "shared": shared,
                    "default": {"per_minute_co2_g": 15.0, "per_hour_co2_g": 2000.0, "per_day_co2_g": 40000.0}},
        "priority": {"by": "carbon", "co2_g_thresholds": [0.05, 0.2, 0.5]},
    }


def _contend(store: str, k: int, tenants: list[str], rate: float, stop, ready) -> None:
    """Another API server: decide + end + settle in the same store at ``rate`` requests/s."""
    ctl = AdmissionController(parse_config(_doc(store, True), "bench"))
    rng = random.Random(100 + k)
    ready.wait()
    i = 0
    while not stop.is_set():
        rid = f"c{k}-{i}"
        mt = rng.choice([64, 256, 512])
        up = 0.1 + 0.001 * mt
        d = ctl.decide(AdmissionRequest(rid, rng.choice(tenants), Predicted(0.1 + 0.0003 * mt, up, 0, 0, mt)))
        if d.admitted:
            ctl.finished(rid)
            ctl.measured(rid, rng.uniform(0.0, 0.3))
        i += 1
        time.sleep(1.0 / rate)
    ctl.close()


def in_situ(n: int, tmp: str, shared: bool = False) -> dict:
    """The hook the API server runs per request (hooks/admission.on_request: predict from the table,
    decide, reserve, record) against EnergyService.on_request alone, Llama-3.1-8B fields on H100."""
    from types import SimpleNamespace

    from llmco2_serve.hooks import _state
    from llmco2_serve.hooks import admission as hook
    from llmco2_serve.runtime.service import EnergyService, ModelInfo
    from llmco2_serve.runtime.settings import load_settings

    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}
    cfg_path = os.path.join(tmp, "admission.toml")
    with open(cfg_path, "w") as f:
        f.write('reload_interval_s = 0\n[request_cap]\nco2_g = 0.5\naction = "lower_max_tokens"\n'
                '[budgets]\nstore = "%s"\nshared = %s\n[budgets.default]\nper_minute_co2_g = 1e6\nper_hour_co2_g = 1e7\n'
                'per_day_co2_g = 1e8\n[priority]\nby = "carbon"\nco2_g_thresholds = [0.01, 0.1]\n'
                % (os.path.join(tmp, "in_situ.sqlite"), "true" if shared else "false"))
    settings = load_settings({"LLMCO2_PAIRS_PATH": "", "LLMCO2_GPU": "H100", "LLMCO2_ADMISSION_CONFIG": cfg_path,
                              "LLMCO2_PROMETHEUS": "0"})
    svc = EnergyService(settings, ModelInfo(llama, "bench", max_model_len=8192, max_num_seqs=256), gpu_names=[],
                        prediction_table="now")
    st = _state.state()
    st.active, st.settings = True, settings
    st.extra["admission"] = hook._Admission(settings)
    rng = np.random.default_rng(2)
    prompts = rng.integers(16, 4096, n).tolist()
    max_tokens = rng.choice([64, 256, 1024, 4096], n).tolist()
    running = rng.integers(0, 256, n).tolist()

    def req(i: int) -> SimpleNamespace:
        return SimpleNamespace(request_id=f"s-{i}", priority=0,
                               sampling_params=SimpleNamespace(max_tokens=int(max_tokens[i])))

    lat_hook, lat_plain, lowered = [], [], 0
    for i in range(n):
        r = req(i)
        t = time.perf_counter_ns()
        hook.on_request(svc, r, prompts[i], running[i], 1)
        lat_hook.append((time.perf_counter_ns() - t) / 1000)
        lowered += r.sampling_params.max_tokens != max_tokens[i]
        hook.on_finished(svc, r.request_id)
        svc.forget(r.request_id)
        t = time.perf_counter_ns()
        svc.on_request(f"p-{i}", prompts[i], int(max_tokens[i]), running[i], 1)
        lat_plain.append((time.perf_counter_ns() - t) / 1000)
        svc.forget(f"p-{i}")
    st.extra["admission"].close()
    h, p = np.array(lat_hook), np.array(lat_plain)
    res = {"n": n, "lowered": lowered,
           "hook_us": {"p50": float(np.percentile(h, 50)), "p99": float(np.percentile(h, 99))},
           "on_request_us": {"p50": float(np.percentile(p, 50)), "p99": float(np.percentile(p, 99))}}
    print(f"in situ (hooks/admission.on_request = predict + decide + reserve + record), n={n}, {lowered} lowered"
          f"{', shared store' if shared else ''}:")
    print(f"  with admission p50 {res['hook_us']['p50']:.1f} us  p99 {res['hook_us']['p99']:.1f} us;  "
          f"EnergyService.on_request alone p50 {res['on_request_us']['p50']:.1f} us  p99 {res['on_request_us']['p99']:.1f} us")
    return res


if __name__ == "__main__":
    main()
