"""Cost of online calibration (issue 7): µs per update (a counter window, a finished request) and
per correction (:meth:`Calibrator.calibrated`), and the size of the saved state.

Updates include the amortised 4x4 solve (every row for the first 64 rows, then every 16). Counter
windows (runtime/windows.py) cost on both sides, measured here too (target: off the step loop or
under 20 µs per window):

* API server, per window observation: the message's ``windows`` rows through ``observe_windows``
  into the calibrator, JSON decoding included (``api_window_observation_us``);
* engine core, per step and per device window: an :class:`EngineMeter` with the Llama-3.1-8B
  predictor on TP=8 fake NVML counters (100 ms updates, offset phases), 32 rows per step with
  chunked prefill, async steps of 20 ms: thread CPU of the step thread's hooks and of the poller
  (which records steps, prices them in GNN joules and closes windows), with window observations
  on and off (``--engine-steps``; ``engine_*``).

Run: ``python benchmarks/calibration_overhead.py [--n 200000] [--engine-steps 20000] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time

from llmco2_serve.prediction.calibration import Calibrator, DeploymentKey
from llmco2_serve.runtime.windows import WindowObservation, observe_windows

KEY = DeploymentKey(model="bench", gpu="NVIDIA H100 80GB HBM3", n_gpu=1, tensor_parallel=1, pipeline_parallel=1,
                    dtype="bfloat16", engine="vllm-0.32.0", predictor="bench")


def _inputs(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = rng.uniform(1, 256)
        p, d = math.exp(rng.uniform(-2, 4)), math.exp(rng.uniform(-1, 5))
        m_p = 2.0 * p * math.exp(rng.gauss(0, 0.1))
        m_d = 0.7 * d * b ** -0.1 * math.exp(rng.gauss(0, 0.1))
        out.append((p, d, m_p, m_d, b))
    return out


def _time(fn, inputs, repeats: int) -> float:
    """Best of ``repeats`` passes (the machine is shared: the minimum is the code's own cost), µs each."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(inputs)
        best = min(best, time.perf_counter() - t0)
    return best / len(inputs) * 1e6


LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "architectures": ["LlamaForCausalLM"]}


def engine_windows(n_steps: int, windows_on: bool, batch: int = 32, tp: int = 8, seed: int = 0) -> dict:
    """Thread CPU per step of the engine-core hooks (step thread) and of the poller, and the device
    windows closed, with counter-window observations on or off (module docstring)."""
    import numpy as np

    from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock
    from llmco2_serve.prediction.predictor import Predictor
    from llmco2_serve.runtime.engine_meter import EngineMeter

    cpu = time.thread_time
    clock = ManualClock()
    reader = FakeEnergyReader([300.0] * tp, clock=clock, phase_s=[0.1 * d / tp for d in range(tp)])
    meter = EngineMeter(reader, Predictor.from_config(LLAMA_8B, gpu="h100"), clock=clock, background_reads=True,
                        window_min_span_s=None if windows_on else -1.0)
    rng = np.random.default_rng(seed)
    live: dict[str, list[int]] = {}  # rid -> [prompt, computed, outputs, target]
    started = 0
    step_cpu = poller_cpu = 0.0
    prev = None
    observations = 0
    for step in range(n_steps):
        while len(live) < batch:
            live[f"r{started}"] = [int(rng.integers(50, 3000)), 0, 0, int(rng.integers(5, 200))]
            started += 1
        rows = []
        for rid, r in live.items():
            if r[1] < r[0]:
                n = min(512, r[0] - r[1])
                rows.append((rid, "prefill", n, r[1]))
                r[1] += n
            else:
                rows.append((rid, "decode", 1, r[1]))
                r[1] += 1
        t0 = cpu()
        meter.step_started(step, rows)
        step_cpu += cpu() - t0
        clock.advance(0.02)
        if prev is not None:
            t0 = cpu()
            meter.step_finished(prev)
            step_cpu += cpu() - t0
        done = []
        for rid, r in live.items():
            if r[1] >= r[0]:
                r[2] += 1
                if r[2] >= r[3]:
                    done.append(rid)
        t0 = cpu()
        for rid in done:
            meter.finished(rid)
            del live[rid]
        meter.pop_final()
        step_cpu += cpu() - t0
        t0 = cpu()
        meter.service_reads(0.0)
        if step % 50 == 0:  # the books message, about once a second
            observations += len(meter.pop_windows())
        poller_cpu += cpu() - t0
        prev = step
    windows_closed = sum(meter.attributor._win_no)
    return {"step_thread_us_per_step": step_cpu / n_steps * 1e6, "poller_us_per_step": poller_cpu / n_steps * 1e6,
            "device_windows": windows_closed, "steps": n_steps, "observations": observations,
            "poller_us_per_device_window": poller_cpu / max(1, windows_closed) * 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000, help="updates per pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine-steps", type=int, default=20_000, help="engine steps per run (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    inputs = _inputs(args.n)

    def windows(xs):
        cal = Calibrator(KEY)
        obs = cal.observe_window
        for p, d, m_p, m_d, b in xs:
            obs(measured_j=m_p + m_d, predicted_prefill_j=p, predicted_decode_j=d, batch=b, source="nvml",
                uncertainty_j=0.01)

    def requests(xs):
        cal = Calibrator(KEY)
        obs = cal.observe_request
        for p, d, m_p, m_d, b in xs:
            obs(predicted_prefill_j=p, predicted_decode_j=d, measured_prefill_j=m_p, measured_decode_j=m_d,
                batch=b, source="nvml", uncertainty_j=0.01, gen_tokens=100)

    active = Calibrator(KEY)
    for p, d, m_p, m_d, b in inputs[:1000]:
        active.observe_window(measured_j=m_p + m_d, predicted_prefill_j=p, predicted_decode_j=d, batch=b,
                              source="nvml")

    def corrections(xs):
        c = active.calibrated
        for p, d, _, _, b in xs:
            c(p, d, b)

    def rejected(xs):
        cal = Calibrator(KEY)
        obs = cal.observe_window
        for p, d, m_p, m_d, b in xs:
            obs(measured_j=m_p + m_d, predicted_prefill_j=p, predicted_decode_j=d, batch=b,
                source="cpu-estimate-codecarbon")

    def solves(xs):
        for _ in xs:
            active._solve()

    # The API side of a counter window: rows as the engine sends them, 16 per message (JSON decoded).
    messages = []
    for i in range(0, len(inputs), 16):
        rows = [WindowObservation(m_p + m_d, 0.05 * (m_p + m_d), p, d, b, 0.6, 6).to_row()
                for p, d, m_p, m_d, b in inputs[i:i + 16]]
        messages.append(json.dumps({"windows": {"source": "nvml", "predictor": "bench", "rows": rows}},
                                   separators=(",", ":")))

    def api_windows(msgs):
        cal = Calibrator(KEY)
        for text in msgs:
            observe_windows(cal, json.loads(text)["windows"])

    res = {
        "n": args.n,
        "window_update_us": _time(windows, inputs, args.repeats),
        "request_update_us": _time(requests, inputs, args.repeats),
        "correction_us": _time(corrections, inputs, args.repeats),
        "rejected_update_us": _time(rejected, inputs, args.repeats),
        "solve_us": _time(solves, inputs[:20_000], args.repeats),
        "api_window_observation_us": _time(api_windows, messages, args.repeats) / 16,
    }
    if args.engine_steps:
        on = engine_windows(args.engine_steps, True)
        off = engine_windows(args.engine_steps, False)
        res["engine_windows_on"], res["engine_windows_off"] = on, off
        res["engine_step_thread_extra_us_per_step"] = on["step_thread_us_per_step"] - off["step_thread_us_per_step"]
        res["engine_poller_extra_us_per_step"] = on["poller_us_per_step"] - off["poller_us_per_step"]
        res["engine_poller_extra_us_per_device_window"] = (
            (on["poller_us_per_step"] - off["poller_us_per_step"]) * on["steps"] / max(1, on["device_windows"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = active.save(os.path.join(tmp, "c.json"))
        res["state_file_bytes"] = os.path.getsize(path)
    res["load_average_1m"] = os.getloadavg()[0]
    res["python"] = sys.version.split()[0]
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    print(f"calibration overhead ({args.n} updates per pass, best of {args.repeats}; "
          f"load average {res['load_average_1m']:.2f}, Python {res['python']}):")
    print(f"  counter window update   {res['window_update_us']:7.2f} us  (incl. the amortised 4x4 solve)")
    print(f"  finished request update {res['request_update_us']:7.2f} us  (two rows: prefill and decode)")
    print(f"  rejected (estimate)     {res['rejected_update_us']:7.2f} us")
    print(f"  correction calibrated() {res['correction_us']:7.2f} us")
    print(f"  one 4x4 solve           {res['solve_us']:7.2f} us")
    print(f"  API server, per counter-window observation (JSON + observe_windows): "
          f"{res['api_window_observation_us']:.2f} us")
    if args.engine_steps:
        on, off = res["engine_windows_on"], res["engine_windows_off"]
        print(f"  engine core, 32 rows/step, TP=8, {on['steps']} steps ({on['device_windows']} device windows -> "
              f"{on['observations']} observations): step thread {off['step_thread_us_per_step']:.1f} -> "
              f"{on['step_thread_us_per_step']:.1f} us/step (windows off -> on; not on its path); poller "
              f"{off['poller_us_per_step']:.1f} -> {on['poller_us_per_step']:.1f} us/step, i.e. "
              f"+{res['engine_poller_extra_us_per_step']:.1f} us per step, "
              f"+{res['engine_poller_extra_us_per_device_window']:.1f} us per device window (off the step loop)")
    print(f"  saved state             {res['state_file_bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
