"""Per-step overhead of EnergyAttributor.on_step (the engine's hot path).

Run: ``python benchmarks/attribution_overhead.py [--requests 64] [--steps 20000]``.
Simulates a server with a constant batch of decoding requests (one finishes and a new one
joins every few steps, a prefill chunk now and then), 10 ms steps, a counter updating every
100 ms, and a manual clock (no sleeping). Prints microseconds per call for:

- ``on_step`` with a counter that costs ~nothing to read (the attributor itself),
- ``on_step`` with FakeEnergyReader (NvmlEnergyReader code over the fake NVML),
- ``on_finished`` and building the step's ScheduledWork list (the hook's share).
"""

from __future__ import annotations

import argparse
import time

from llmco2_serve.runtime.attribution import EnergyAttributor, ScheduledWork
from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock


class _RampReader:
    """Cheapest possible counter: 300 W per device, updated every 100 ms."""

    source = "bench"
    update_period_s = 0.1

    def __init__(self, clock: ManualClock, n_devices: int) -> None:
        self._clock = clock
        self._n = n_devices

    def device_names(self) -> list[str]:
        return [f"bench:{i}" for i in range(self._n)]

    def energy_mj(self) -> list[int]:
        v = int(self._clock() / 0.1) * 30_000
        return [v] * self._n

    def close(self) -> None:
        pass


def run(reader_kind: str, n_requests: int, n_steps: int, n_devices: int) -> dict[str, float]:
    clock = ManualClock(0.0)
    if reader_kind == "ramp":
        reader = _RampReader(clock, n_devices)
    else:
        reader = FakeEnergyReader([300.0] * n_devices, clock=clock)
    att = EnergyAttributor(reader, clock=clock)
    active = {f"r{i}": 100 + i for i in range(n_requests)}
    next_id = n_requests
    step_s = 0.01
    t_step = t_finish = t_build = 0.0
    n_finished = 0
    for k in range(n_steps):
        b0 = time.perf_counter()
        work = [
            ScheduledWork(rid, "prefill" if (k + ctx) % 97 == 0 else "decode",
                          64 if (k + ctx) % 97 == 0 else 1, ctx, 1.0 + ctx * 1e-3)
            for rid, ctx in active.items()
        ]
        b1 = time.perf_counter()
        t_build += b1 - b0
        clock.set(round((k + 1) * step_s, 9))
        s0 = time.perf_counter()
        att.on_step(k * step_s, (k + 1) * step_s, work)
        t_step += time.perf_counter() - s0
        for rid in active:
            active[rid] += 1
        if k % 3 == 0:  # churn: one leaves, one joins
            rid = next(iter(active))
            del active[rid]
            f0 = time.perf_counter()
            att.on_finished(rid)
            t_finish += time.perf_counter() - f0
            n_finished += 1
            active[f"r{next_id}"] = 0
            next_id += 1
        if k % 1000 == 0:
            att.pop_finalized()
    return {
        "on_step_us": 1e6 * t_step / n_steps,
        "on_finished_us": 1e6 * t_finish / max(1, n_finished),
        "build_work_us": 1e6 * t_build / n_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{args.requests} requests/step, {args.steps} steps of 10 ms, counter update 100 ms")
    for n_devices in (1, 8):
        for kind in ("ramp", "fake"):
            r = run(kind, args.requests, args.steps, n_devices)
            print(
                f"  devices={n_devices} reader={kind:4s}  on_step {r['on_step_us']:7.1f} us/step"
                f"   on_finished {r['on_finished_us']:5.1f} us"
                f"   (building ScheduledWork list: {r['build_work_us']:6.1f} us/step)"
            )


if __name__ == "__main__":
    main()
