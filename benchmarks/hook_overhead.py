"""CPU cost the plugin adds inside vLLM, measured directly (deterministic, unlike end-to-end runs).

* engine core, per step: the scheduler hooks' work (``step_rows``, ``EngineMeter.step_started``,
  ``step_finished``, ``finished``, ``pop_final``) at 32 and 128 rows per step under vLLM's step
  pattern (async scheduling, chunked prefill mixed with decode, churn over 100k requests) with TP=8
  fake NVML devices whose counters behave like the real one (mJ, 100 ms updates, offset phases);
* engine core, per request, when every request is one token long (issue 10's load): each step's
  requests all finish while that step is still queued for the poller, so each first answer looks
  ahead over it (``engine_one_token_us``); the pattern a served one-token load showed;
* API server, per request: ``EnergyService.on_request`` (prediction) + ``on_finished`` (span attributes);
  and with the measurement on: + the engine's first answer and final value (``on_engine_finals``).

Compare with vLLM's own step time (a Llama-3.1-8B decode step at batch 32 on an H100 is ~15-25 ms):
the engine-core cost is serial with the step, so cost / step time is the throughput loss bound.
Run: python benchmarks/hook_overhead.py [--json OUT] [--requests N]   (targets: <= 60 us at 32 rows, <= 150 us at 128)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock
from llmco2_serve.prediction.predictor import Predictor
from llmco2_serve.runtime.service import EnergyService, EngineMeter, ModelInfo
from llmco2_serve.runtime.settings import load_settings

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "architectures": ["LlamaForCausalLM"]}


# CPU time of this thread: what the hooks cost the engine's step thread, and robust to other
# processes on a shared machine (wall-clock timings there swing 2-3x with the load).
_cpu = time.thread_time


class _Req:
    __slots__ = ("request_id", "num_prompt_tokens", "num_computed_tokens", "num_output_tokens", "target")

    def __init__(self, rid: str, prompt: int, target: int) -> None:
        self.request_id, self.num_prompt_tokens, self.num_computed_tokens = rid, prompt, 0
        self.num_output_tokens, self.target = 0, target


def engine_step_us(batch: int, n_requests: int = 100_000, tp: int = 8, chunk: int = 512,
                   seed: int = 0) -> dict:
    """Per-step cost of the engine-core hooks under vLLM's real step pattern.

    ``batch`` running requests, TP ``tp`` fake NVML devices with offset 100 ms counter updates,
    async scheduling (step N+1 is scheduled before step N finishes), chunked prefill (prompts of
    50-3000 tokens in chunks of <= ``chunk`` tokens, mixed with decode rows), churn (outputs of
    5-200 tokens, a new request as soon as one finishes, ``n_requests`` in all). Timed: the
    scheduler hook (``step_rows`` + ``step_started``), the update hook (``step_finished``),
    ``finished`` of each finishing request and ``pop_final`` once per step, as hooks/engine_core.py
    calls them on the step thread, and separately the poller thread's reads and window closes
    (``service_reads``). Returns mean microseconds (thread CPU time) per step overall and in the
    first/last 10% of requests.
    """
    from types import SimpleNamespace

    from llmco2_serve.hooks.engine_core import step_rows

    clock = ManualClock()
    reader = FakeEnergyReader([300.0] * tp, clock=clock, phase_s=[0.1 * d / tp for d in range(tp)])
    meter = EngineMeter(reader, Predictor.from_config(LLAMA_8B, gpu="h100"), clock=clock, background_reads=True)
    rng = np.random.default_rng(seed)
    sched = SimpleNamespace(requests={})
    started = finished = 0
    costs: list[tuple[int, float]] = []
    background = 0.0
    prev_key = None
    step = 0
    while finished < n_requests:
        while len(sched.requests) < batch and started < n_requests:
            rid = f"req-{started}"
            sched.requests[rid] = _Req(rid, int(rng.integers(50, 3000)), int(rng.integers(5, 200)))
            started += 1
        # schedule: every running request gets its next chunk or decode token (token budget ignored)
        scheduled = {}
        for r in sched.requests.values():
            n = min(chunk, r.num_prompt_tokens - r.num_computed_tokens) if r.num_computed_tokens < r.num_prompt_tokens else 1
            r.num_computed_tokens += n
            scheduled[r.request_id] = n
        so = SimpleNamespace(num_scheduled_tokens=scheduled, scheduled_spec_decode_tokens={})
        t0 = _cpu()
        meter.step_started(step, step_rows(sched, so))
        cost = _cpu() - t0
        clock.advance(0.02)
        if prev_key is not None:  # async: the previous step finishes after this one was scheduled
            t0 = _cpu()
            meter.step_finished(prev_key)
            cost += _cpu() - t0
        done = []
        for r in sched.requests.values():
            if r.num_computed_tokens >= r.num_prompt_tokens:
                r.num_output_tokens += 1
                if r.num_output_tokens >= r.target:
                    done.append(r.request_id)
        t0 = _cpu()
        for rid in done:
            meter.finished(rid)
            del sched.requests[rid]
        meter.pop_final()
        cost += _cpu() - t0
        t0 = _cpu()  # the poller thread's share: the read the step flagged, windows closed
        meter.service_reads(0.0)
        background += _cpu() - t0
        finished += len(done)
        costs.append((finished, cost))
        prev_key = step
        step += 1
    us = np.array([c for _, c in costs]) * 1e6
    done_at = np.array([f for f, _ in costs])
    first = us[done_at <= n_requests * 0.1]
    last = us[done_at >= n_requests * 0.9]
    return {"us_per_step": float(us.mean()), "background_us_per_step": background / len(us) * 1e6,
            "first_10pct_us": float(first.mean()),
            "last_10pct_us": float(last.mean()), "steps": len(us),
            "live_ledger_entries_at_end": meter.attributor.live_requests}


def engine_one_token_us(per_step: int = 10, n_steps: int = 3000, seed: int = 0) -> dict:
    """Per-request cost of the engine-core hooks when every request is one token long (issue 10's
    load): each step prefills ``per_step`` new requests, which all finish at that step's output,
    while the step still waits in the queue for the poller (the step thread never waits for it: in a
    server the poller gets the GIL only after the step thread's whole ``update_from_output``). So each
    finishing request's first answer looks ahead over its queued step, its entry is new, and the
    poller then records the step and delivers the finals. One fake counter updating every 50 ms
    (``LLMCO2_ENERGY_READER=fake-work``'s period), steps of 3 ms; the poller runs after every
    second step. Returns microseconds (thread CPU time) per request on the step thread (scheduler and
    update hooks, ``finished`` + the first answer's JSON for each request, ``pop_final``) and on the
    poller (``service_reads``)."""
    from llmco2_serve.runtime.service import encode_measured

    clock = ManualClock()
    reader = FakeEnergyReader([300.0], clock=clock, update_period_s=0.05)
    meter = EngineMeter(reader, Predictor.from_config(LLAMA_8B, gpu="h100"), clock=clock, background_reads=True)
    rng = np.random.default_rng(seed)
    step_s = poll_s = 0.0
    n = 0
    warm = n_steps // 10
    for step in range(n_steps + warm):
        rids = [f"r{step}-{i}" for i in range(per_step)]
        rows = [(rid, "prefill", int(rng.integers(8, 64)), 0) for rid in rids]
        t0 = _cpu()
        meter.step_started(step, rows)
        clock.advance(0.003)
        meter.step_finished(step)
        for rid in rids:
            encode_measured(meter.finished(rid), 1)
        meter.pop_final()
        t1 = _cpu()
        if step % 2:
            meter.service_reads(0.0)
        t2 = _cpu()
        if step >= warm:
            step_s += t1 - t0
            poll_s += t2 - t1
            n += per_step
    return {"step_thread_us_per_request": step_s / n * 1e6, "poller_us_per_request": poll_s / n * 1e6,
            "requests_per_step": per_step}


def _llama_service() -> EnergyService:
    settings = load_settings({"LLMCO2_PAIRS_PATH": "", "LLMCO2_GPU": "H100"})
    # prediction_table="now": the server's hot path once its start-up table is built (not a race with it)
    return EnergyService(settings, ModelInfo(LLAMA_8B, "llama-3.1-8b", max_model_len=8192, max_num_seqs=256),
                         gpu_names=[], prediction_table="now")


def api_request_us(n: int = 2000) -> float:
    svc = _llama_service()
    measured = {"prefill_energy_j": 1.0, "decode_energy_j": 5.0, "energy_j": 6.0, "uncertainty_j": 0.5,
                "source": "nvml"}
    t = time.perf_counter()
    for i in range(n):
        svc.on_request(f"q{i}", 500 + i % 1000, 256, running_requests=i % 32)
        svc.on_finished(f"q{i}", 128, measured)
    return (time.perf_counter() - t) / n * 1e6


def api_request_measured_us(n: int = 16000, batch: int = 16) -> float:
    """API server, per request with the measurement on (NVML on a GPU): the prediction, the engine's
    first answer (decoded from its trace header, span attributes, output-length learning) and the
    final value (``on_engine_finals``: measured metrics, Prometheus series, relative errors, the
    calibrator's request observation), ``batch`` requests per engine message as under load."""
    from llmco2_serve.runtime.service import decode_measured, encode_measured
    from llmco2_serve.runtime.attribution import MeasuredEnergy

    svc = _llama_service()
    first = encode_measured(MeasuredEnergy(request_id="x", prefill_energy_j=1.0, decode_energy_j=5.0, energy_j=6.0,
                                           uncertainty_j=0.5, estimated_energy_j=5.5, source="nvml", n_steps=3,
                                           n_preemptions=0, aborted=False, final=False), 1)

    def run(count: int, base: int) -> None:
        for s in range(base, base + count, batch):
            ids = [f"q{i}" for i in range(s, s + batch)]
            for rid in ids:
                svc.on_request(rid, 16, 1, running_requests=32)
            for rid in ids:
                svc.on_finished(rid, 1, decode_measured(first), span=False)
            finals = [[rid, 0.9, 4.8, 0.5, 5.5, "nvml", 3, 0, False, 30.2, None, 1] for rid in ids]
            svc.on_engine_finals(json.dumps({"finals": finals}, separators=(",", ":")))

    run(n // 4, 0)  # warm: the calibrator and the output-length model past their first observations
    t = time.perf_counter()
    run(n, 10**7)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--requests", type=int, default=100_000)
    args = ap.parse_args()
    result: dict = {}
    for b in (32, 128):
        r = result[f"engine_batch_{b}"] = engine_step_us(b, n_requests=args.requests)
        print(f"engine core, {b:3d} rows/step, TP=8, churn over {args.requests} requests, chunked prefill, "
              f"async: {r['us_per_step']:6.1f} us per step (first 10%: {r['first_10pct_us']:.1f}, "
              f"last 10%: {r['last_10pct_us']:.1f}; {r['us_per_step'] / 200:.2f}% of a 20 ms GPU step); "
              f"poller thread (reads, windows): {r['background_us_per_step']:.1f} us per step")
    for k in (1, 10, 32):
        r = result[f"engine_one_token_{k}_per_step"] = engine_one_token_us(k)
        print(f"engine core, one-token requests, {k:2d} finishing per step (each step still queued for the "
              f"poller): {r['step_thread_us_per_request']:5.1f} us per request on the step thread, "
              f"{r['poller_us_per_request']:5.1f} us on the poller thread")
    result["api_per_request_us"] = api_request_us()
    print(f"API server, per request (predict + span attributes): {result['api_per_request_us']:.0f} us")
    result["api_per_request_measured_us"] = api_request_measured_us()
    print(f"API server, per request with the measurement on (predict, first answer, final value, Prometheus, "
          f"calibration): {result['api_per_request_measured_us']:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
