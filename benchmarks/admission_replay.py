"""Replay the Azure conversation trace through the admission policies against a real hourly
carbon-intensity series, side by side with no policy (issue 9).

What is real and what is assumed (printed with the results):

* Requests: the Azure LLM inference trace 2023, conversation service (prompt and generated token
  counts and arrival times within its hour; CC BY 4.0, ``llmco2_serve/data/AZURE_TRACE.md``), from
  ``--trace`` (the full file, ``../shared/data/azure-llm-trace-2023/AzureLLMInferenceTrace_conv.csv``)
  or the packaged slice. The trace covers one hour (2023-11-16 18:15-19:15); to meet a daily grid
  cycle its hour is **tiled**: every simulated hour receives ``--per-hour`` of its requests (a fixed
  sample, same offsets within the hour). The spread over the day is therefore ASSUMED flat.
* Grid: Electricity Maps' hourly carbon intensity for Germany 2022 (LCA column; ODbL;
  ``llmco2_serve/data/DE_2022_HOURLY.md``), read by the plugin's own ``FileIntensity``, over
  ``--days`` days from ``--start``. Deferral reads the series' future as a perfect forecast.
* Energy: the plugin's GNN predictor (packaged vllm profile) for Llama-3.1-8B on one H100 at a fixed
  batch context of ``--batch`` (a request's share of that batch), for the tokens actually generated;
  reservations and caps use the upper bound at ``--max-tokens`` (ASSUMED: the trace has no
  max_tokens), and expected values the plugin's Azure output-length prior. Operational CO2 only
  (PUE ``--pue``); energy per request does not depend on load here (no capacity model).
* Policies run the plugin's own ``AdmissionController`` with a simulated clock. Which requests are
  deferrable (``--deferrable`` fraction) and which tenant sends each request (``--tenants``) are
  ASSUMED (a hash of the row).

Run: python benchmarks/admission_replay.py [--trace CSV] [--days 7] [--start 2022-03-07] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import os
import sys

import numpy as np

from llmco2_serve.admission import AdmissionController, AdmissionRequest, Predicted, parse_config

LLAMA_8B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}
SHARED_TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "azure-llm-trace-2023",
                            "AzureLLMInferenceTrace_conv.csv")
ANCHORS = [
    ("DynamoLLM", "energy -53%, operational carbon -38% at unchanged SLOs",
     "GPU frequency scaling, instance re-sharding (TP degree), instance scaling per load class", "none of these"),
    ("EcoServe", "carbon up to -47%",
     "as we read it: reduce/reuse/rightsize/recycle - hardware provisioning and reuse (older GPUs, CPU offload), rightsizing, embodied-carbon-aware placement",
     "none of these"),
    ("GreenLLM", "energy up to -34% with < 3.5% more SLO violations",
     "per-phase GPU frequency control (prefill vs decode)", "none of these"),
]


def h8(s: str) -> float:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def load_trace(path: str) -> list[tuple[float, int, int]]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("trace", "conv") != "conv":
                continue
            ts = dt.datetime.fromisoformat(r["TIMESTAMP"][:26]).replace(tzinfo=dt.timezone.utc).timestamp()
            rows.append((ts, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    rows.sort()
    t0 = rows[0][0]
    return [(t - t0, p, g) for t, p, g in rows]


class SeriesIntensity:
    """The controller's IntensitySource over the plugin's FileIntensity (``next_hour_below``)."""

    def __init__(self, src) -> None:
        self.src = src

    def now_g_per_kwh(self, t: float) -> float:
        return self.src.at(t).g_per_kwh

    def next_below(self, threshold: float, now: float, horizon: float) -> float | None:
        return self.src.next_hour_below(threshold, now, horizon)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=SHARED_TRACE if os.path.exists(SHARED_TRACE) else None)
    ap.add_argument("--start", default="2022-03-07", help="first simulated day (UTC) in the 2022 series")
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--per-hour", type=int, default=300, help="trace requests per simulated hour")
    ap.add_argument("--max-tokens", type=int, default=2048, help="ASSUMED max_tokens of every request")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pue", type=float, default=1.2)
    ap.add_argument("--deferrable", type=float, default=0.3, help="ASSUMED fraction of deferrable requests")
    ap.add_argument("--tenants", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()

    from llmco2_serve.carbon.intensity import FileIntensity, packaged_series_path
    from llmco2_serve.prediction.predictor import Predictor
    from llmco2_serve.workload.output_length import OutputLengthModel

    if args.trace:
        trace = load_trace(args.trace)
        trace_name = os.path.relpath(args.trace)
    else:
        from importlib import resources
        trace = load_trace(str(resources.files("llmco2_serve.data").joinpath("azure_trace_slice.csv")))
        trace_name = "packaged azure_trace_slice.csv (conv rows)"
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(trace), size=min(args.per_hour, len(trace)), replace=False))
    hour = [trace[i] for i in pick]
    hour = [(t % 3600.0, p, g) for t, p, g in hour]
    start = dt.datetime.fromisoformat(args.start).replace(tzinfo=dt.timezone.utc).timestamp()
    reqs = []  # (arrival s, prompt, gen, id)
    for h in range(24 * args.days):
        for j, (off, p, g) in enumerate(hour):
            reqs.append((start + h * 3600 + off, p, g, f"{h}-{j}"))
    reqs.sort()
    n = len(reqs)
    arrival = np.array([r[0] for r in reqs])
    prompt = np.array([max(1, r[1]) for r in reqs])
    gen = np.minimum(np.array([max(1, r[2]) for r in reqs]), args.max_tokens)
    ids = [r[3] for r in reqs]

    src = FileIntensity(packaged_series_path("DE_2022_hourly.csv"), static_g_per_kwh=481.0)
    intensity = SeriesIntensity(src)
    pred = Predictor.from_config(LLAMA_8B, gpu="H100", profile="vllm")
    b = args.batch
    j_per_kwh = 3.6e6

    def energy(p: np.ndarray, g: np.ndarray) -> np.ndarray:
        return pred.predict_many(p, g, batch=b).energy_j / b

    expected_tokens = OutputLengthModel().estimate("llama", args.max_tokens).expected_tokens
    e_actual = energy(prompt, gen)
    e_upper = energy(prompt, np.full(n, args.max_tokens))
    e_expected = energy(prompt, np.full(n, expected_tokens))
    ci_arr = np.array([intensity.now_g_per_kwh(t) for t in arrival])

    def co2(e_j: float, t: float) -> float:
        return e_j * args.pue * intensity.now_g_per_kwh(t) / j_per_kwh

    base_co2 = e_actual * args.pue * ci_arr / j_per_kwh
    days = args.days
    tenant = [f"t{int(h8(i) * args.tenants)}" for i in ids]
    deferrable = np.array([h8("d" + i) < args.deferrable for i in ids])
    hours_ci = np.array([intensity.now_g_per_kwh(start + 3600 * h + 1) for h in range(24 * days)])
    threshold = float(np.median(hours_ci))
    upper_co2_now = e_upper * args.pue * ci_arr / j_per_kwh
    cap_g = float(np.percentile(upper_co2_now, 95))
    per_tenant_day = {t: 0.0 for t in set(tenant)}
    for t, c in zip(tenant, base_co2):
        per_tenant_day[t] += c / days
    budget_g = 0.8 * float(np.mean(list(per_tenant_day.values())))

    policies = {
        "none": {},
        "cap-refuse (p95 of upper)": {"request_cap": {"co2_g": cap_g}},
        "cap-lower-max-tokens": {"request_cap": {"co2_g": cap_g, "action": "lower_max_tokens"}},
        "tenant-budget (0.8 x mean daily)": {"budgets": {"default": {"per_day_co2_g": budget_g}}},
        f"deferral (>{threshold:.0f} g/kWh, 24 h)": {"deferral": {"max_intensity_g_per_kwh": threshold,
                                                                 "horizon_s": 86400}},
    }
    results = {}
    for name, doc in policies.items():
        now = [start]
        ctl = AdmissionController(parse_config(doc, name), intensity=intensity, clock=lambda: now[0])
        total = tokens = 0.0
        served = refused = deferred_n = lowered = 0
        delays = []
        # events: (time, index, first arrival); deferred requests come back at their Retry-After
        import heapq
        q = [(arrival[i], i, arrival[i]) for i in range(n)]
        heapq.heapify(q)
        while q:
            t, i, t_first = heapq.heappop(q)
            now[0] = t

            def at(m: int, i=i, t=t) -> Predicted:
                eu = float(energy(np.array([prompt[i]]), np.array([m]))[0])
                ee = float(energy(np.array([prompt[i]]), np.array([min(m, expected_tokens)]))[0])
                return Predicted(co2(ee, t), co2(eu, t), ee, eu, m)

            p = Predicted(co2(float(e_expected[i]), t), co2(float(e_upper[i]), t), float(e_expected[i]),
                          float(e_upper[i]), args.max_tokens)
            rid = f"{ids[i]}@{t:.0f}"
            d = ctl.decide(AdmissionRequest(rid, tenant[i], p, bool(deferrable[i]), 0, at), now=t)
            if d.decision == "defer":
                deferred_n += 1
                heapq.heappush(q, (t + max(1.0, d.retry_after_s), i, t_first))
                continue
            if not d.admitted:
                refused += 1
                continue
            g = int(gen[i]) if d.max_tokens is None else min(int(gen[i]), d.max_tokens)
            if d.max_tokens is not None:
                lowered += 1
            e = float(e_actual[i]) if g == gen[i] else float(energy(np.array([prompt[i]]), np.array([g]))[0])
            c = co2(e, t)
            total += c
            tokens += g
            served += 1
            if t > t_first:
                delays.append(t - t_first)
            ctl.measured(rid, c)
            ctl.finished(rid)
        ctl.close()
        results[name] = {"co2_kg": total / 1000, "served": served, "refused": refused,
                         "deferred": deferred_n, "lowered": lowered, "output_tokens": tokens,
                         "g_per_1k_tokens": 1000 * total / tokens if tokens else float("nan"),
                         "delay_mean_h": float(np.mean(delays) / 3600) if delays else 0.0,
                         "delay_p95_h": float(np.percentile(delays, 95) / 3600) if delays else 0.0}
    base = results["none"]
    print(f"Replay: {n} requests ({args.per_hour}/h of {trace_name}, tiled over {days} days from {args.start}); "
          f"grid DE 2022 hourly (Electricity Maps, LCA, mean {hours_ci.mean():.0f} g/kWh over these days); "
          f"Llama-3.1-8B on H100, batch {b}, max_tokens {args.max_tokens} (assumed); "
          f"{args.deferrable:.0%} deferrable, {args.tenants} tenants (assumed)")
    hdr = f"{'policy':38s} {'CO2 kg':>8s} {'saved':>7s} {'g/1k tok':>9s} {'served':>7s} {'refused':>7s} " \
          f"{'deferred':>8s} {'lowered':>7s} {'tokens':>7s} {'delay mean/p95 (h)':>19s}"
    print(hdr)
    for name, r in results.items():
        saved = 1 - r["co2_kg"] / base["co2_kg"]
        print(f"{name:38s} {r['co2_kg']:8.3f} {saved:7.1%} {r['g_per_1k_tokens']:9.4f} {r['served']:7d} "
              f"{r['refused']:7d} {r['deferred']:8d} {r['lowered']:7d} {r['output_tokens'] / base['output_tokens']:7.1%} "
              f"{r['delay_mean_h']:9.2f}/{r['delay_p95_h']:.2f}")
        r["saved"] = saved
    print("Carbon 'saved' by refusing or truncating is work not done (see tokens); only deferral saves carbon "
          "for the same work, by moving it to cleaner hours (g/1k tokens).")
    print("Anchors (their papers' numbers; mechanisms this plugin does NOT have):")
    for who, num, mech, have in ANCHORS:
        print(f"  {who}: {num}; mechanisms: {mech}; in this plugin: {have}")
    print("This plugin has: admission (refuse / lower max_tokens / defer to cleaner hours), tenant budgets, and "
          "request priority under vLLM's priority scheduler; no GPU frequency control, no re-sharding or scaling.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "threshold_g_per_kwh": threshold, "cap_g": cap_g,
                       "budget_g_per_day": budget_g, "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
