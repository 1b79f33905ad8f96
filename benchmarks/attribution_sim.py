"""Measured energy per request vs a ground truth, under vLLM's real step patterns (simulated).

Runs the scenarios of ``tests/test_attribution_sim.py`` at a larger scale through
``tests/sim_engine.py`` (a discrete-event vLLM v1 engine core: async or synchronous scheduling,
chunked prefill mixed with decode, preemption with prefix-cache hits, stop strings, client aborts,
idle spells with an idle poller, TP/DP devices; its own power model and NVML-like counters that
update every 20-100 ms with jitter) driving ``EngineMeter`` with a real Llama-3.1-8B/H100
predictor, and prints one row per scenario:

* ``total / prefill / decode med p90``: relative error |final - truth| / truth of the final
  values (truth: ``sim_engine``'s docstring);
* ``cov1x``: share of requests with |final - truth| <= uncertainty_j; ``u/E``: median relative
  uncertainty (coverage is only meaningful if this is small);
* ``1st-final``: share of ``finished()`` answers that were already final;
* ``ghosts``: ledger entries of finished requests left after the run; ``cons J``: largest
  |sum(finals) + idle + unreported - counter total| over engines; ``idle err``: (meter idle -
  true idle) / total energy;
* ``us/step``: CPU cost of the meter calls per engine step (step_started, step_finished,
  preempted, finished, pop_final) on this machine, and over the first -> last quarter of the
  run (flat means no per-request growth).

Run: python benchmarks/attribution_sim.py [--json OUT] [--quick]   (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sim_engine import (  # noqa: E402
    LLAMA_8B,
    EngineConfig,
    SimRequest,
    Simulation,
    add_endings,
    poisson_requests,
    summarize,
    trace_requests,
)

from llmco2_serve.prediction.predictor import Predictor  # noqa: E402

PERIODS = (0.02, 0.1)  # counter update period range per device (NVML varies by GPU and driver)


def _idle_spells(n: int, seed: int) -> list[SimRequest]:
    """Bursts of Poisson traffic separated by 10-40 s of idle."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: list[SimRequest] = []
    t = 0.0
    while len(out) < n:
        burst = poisson_requests(min(40, n - len(out)), rate_per_s=6.0, seed=int(rng.integers(1 << 30)), t0=t)
        for r in burst:
            r.rid = f"r{len(out)}"
            out.append(r)
        t = out[-1].arrival_s + float(rng.uniform(10.0, 40.0))
    return out


def scenarios(scale: float) -> list[tuple[str, EngineConfig, int, object]]:
    n = lambda k: max(50, int(k * scale))  # noqa: E731

    def conv():
        r = trace_requests(n(2000), rate_per_s=6.0)
        add_endings(r, stop_frac=0.2, abort_frac=0.05, shared_prefix=256, prefix_frac=0.3)
        return r

    def code():
        r = trace_requests(n(2000), rate_per_s=5.0, trace="code")
        add_endings(r, stop_frac=0.1, abort_frac=0.05)
        return r

    def sync():
        r = trace_requests(n(1500), rate_per_s=6.0)
        add_endings(r, stop_frac=0.2, abort_frac=0.2)
        return r

    def b128():
        r = poisson_requests(n(3000), rate_per_s=40.0, seed=11, prompt=(50, 3000), output=(10, 400))
        add_endings(r, stop_frac=0.2, abort_frac=0.05, seed=12)
        return r

    def preempt():
        return poisson_requests(n(1500), rate_per_s=10.0, seed=7, prompt=(200, 1500), output=(100, 400))

    def churn():
        r = poisson_requests(n(10000), rate_per_s=60.0, seed=5, prompt=(20, 300), output=(5, 60))
        add_endings(r, stop_frac=0.1, abort_frac=0.05, seed=6, abort_within_s=1.0)
        return r

    def tp4():
        r = trace_requests(n(1500), rate_per_s=8.0)
        add_endings(r, stop_frac=0.2, abort_frac=0.05)
        return r

    def dp2():
        r = trace_requests(n(2000), rate_per_s=10.0)
        add_endings(r, stop_frac=0.2, abort_frac=0.05)
        return r

    def mixed():
        r = [SimRequest(f"d{i}", 0.0, 200, 1200) for i in range(32)]
        return r + [SimRequest(f"c{j}", 2.0 + j, 512, 1) for j in range(10)]

    return [
        ("async conv trace b32", EngineConfig(update_period_s=PERIODS), 1, conv),
        ("async code trace b32", EngineConfig(update_period_s=PERIODS), 1, code),
        ("sync conv trace, 20% aborts", EngineConfig(async_scheduling=False, update_period_s=PERIODS), 1, sync),
        ("async b128, 8k token budget", EngineConfig(max_num_seqs=128, max_num_batched_tokens=8192,
                                                     update_period_s=PERIODS), 1, b128),
        ("preemption + prefix hits", EngineConfig(kv_blocks=700, update_period_s=PERIODS), 1, preempt),
        ("idle spells 10-40 s", EngineConfig(update_period_s=PERIODS), 1, lambda: _idle_spells(n(600), 3)),
        ("churn 10k short, b32", EngineConfig(update_period_s=PERIODS), 1, churn),
        ("TP=4 offset counters", EngineConfig(tp=4, update_period_s=PERIODS), 1, tp4),
        ("DP=2 x TP=2", EngineConfig(tp=2, update_period_s=PERIODS), 2, dp2),
        ("512-chunk + 32 decode rows", EngineConfig(max_num_seqs=40), 1, mixed),
    ]


def _f(x: float, pct: bool = True) -> str:
    if x != x:
        return "   -"
    return f"{100 * x:4.0f}" if pct else f"{x:6.1f}"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="a fifth of the requests")
    ap.add_argument("--only", help="run the scenarios whose name contains this")
    args = ap.parse_args(argv)
    predictor = Predictor.from_config(LLAMA_8B, gpu="h100")
    rows = []
    t0 = time.perf_counter()
    print("relative errors in %; u/E = median uncertainty / energy; us/step = meter CPU cost per step")
    head = (f"{'scenario':30s} {'reqs':>6s} {'steps':>7s} | {'total':>9s} | {'prefill':>9s} | {'decode':>9s} | "
            f"{'cov1x':>5s} {'u/E':>4s} {'1st-final':>9s} | {'ghosts':>6s} {'cons J':>7s} {'idle err':>8s} | "
            f"{'us/step':>7s} {'first->last':>13s}")
    print(head)
    print(f"{'':30s} {'':>6s} {'':>7s} | {'med  p90':>9s} | {'med  p90':>9s} | {'med  p90':>9s} |")
    print("-" * len(head))
    for i, (name, cfg, dp, make) in enumerate(scenarios(0.2 if args.quick else 1.0)):
        if args.only and args.only not in name:
            continue
        sim = Simulation(cfg, dp=dp, predictor=predictor, seed=100 + i)
        res = sim.run(make())
        s = summarize(res)
        s["scenario"] = name
        rows.append(s)
        print(f"{name:30s} {s['requests']:6d} {s['steps']:7d} | {_f(s['total_med'])} {_f(s['total_p90'])} | "
              f"{_f(s['prefill_med'])} {_f(s['prefill_p90'])} | {_f(s['decode_med'])} {_f(s['decode_p90'])} | "
              f"{_f(s['coverage_1x']):>5s} {_f(s['median_rel_u'])} {_f(s['first_final_share']):>9s} | "
              f"{s['ghosts']:6d} {s['conservation_err_j']:7.3f} {100 * s['idle_err']:7.2f}% | "
              f"{s['meter_us_per_step']:7.1f} {s['meter_us_first']:6.1f}->{s['meter_us_last']:<6.1f}", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
