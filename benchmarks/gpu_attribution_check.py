"""Check EnergyAttributor against the real NVML counter with synthetic requests of known cost.

Run (GPU machine, torch + nvidia-ml-py, no vLLM needed)::

    python benchmarks/gpu_attribution_check.py --out $OUT --duration-s 60

    python benchmarks/gpu_attribution_check.py --dry-run   # CPU: fake counter, simulated GPU

What it does (about 100 s with the defaults):

1. Idle power ``p_idle``: the counter's slope while nothing runs (before the work and again
   after it; the mean is used). The counter's update period is taken from the times at which
   the polled value changed.
2. Phase B, ground truth: each workload's per-step work (bf16 matmuls, then
   ``torch.cuda.synchronize()``) runs ALONE, back to back, for ``--alone-s`` seconds split into
   two passes (forward then reverse workload order, so thermal drift shows as a pass-to-pass
   spread). Each pass starts and ends at a counter change, so its energy is exact up to the
   counter's own error: ``E_step = dE / n_steps`` (joules per step, with idle power),
   ``tau = dt / n_steps`` (wall seconds per step) and ``E_dyn = E_step - p_idle * tau``.
3. Phase A, continuous batching: for ``--duration-s`` seconds the workloads come and go as
   request *instances* (joins, leaves, one global idle gap); a step runs the matmuls of the
   instances active in it back to back, then synchronizes. Several attributors watch the same
   steps, each through its own ``NvmlEnergyReader([0])``:

   - ``flops``: weight = the workload's FLOPs per step, ``step_split="duration"`` (the proxy a
     predictor would give),
   - ``oracle``: weight = phase B's ``E_step``, ``step_split="duration"`` (isolates the
     attributor's own error from the weight proxy's),
   - ``oracle_weight_split``: the same weights, ``step_split="weight"``.

Idle accounting (stated, since "the truth" depends on it). Instance ``r`` of workload ``k``
that took part in ``n_r`` steps is expected to have

- total-with-idle-share: ``n_r * E_step_k``: its dynamic energy plus idle power for the wall
  time it held the GPU (``tau_k`` per step; time-proportional idle share). This is what the
  attributor estimates: it gives a step ALL of its window's energy (static power included) and
  gives only time with no step to idle.
- dynamic-only: ``n_r * E_dyn_k`` against ``attributed - p_idle * n_r * tau_k`` (the same idle
  share taken off the attributed value). The error is relative to a smaller number, so it is the
  stricter view of how the weight split does.

Output: ``report.json`` and ``report.txt`` in ``--out`` (default ``$OUT``, else
``./gpu-check-out``): per-instance and per-workload tables (attributed J +- uncertainty,
expected J, relative error, ``|error| <= uncertainty``), conservation (``attributed + idle ==
counter delta`` from the values the attributor's reader returned), additivity (phase A
counter energy vs the sum of alone expectations + idle), update period, GPU name.

``--dry-run`` replaces the GPU with a simulated one (``FakeEnergyReader`` over a power model,
``ManualClock``): a workload of ``F`` FLOPs at throughput ``T`` runs ``F / T`` seconds at power
``c * T`` (so energy per FLOP is ``c`` for every size, and FLOPs weights are exact), with a
50 us host gap per step at idle power. It never imports torch. Never imports vLLM.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import llmco2_serve  # noqa: F401
except ImportError:  # run from a checkout that is not pip-installed (the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmco2_serve.attribution import EnergyAttributor, MeasuredEnergy, ScheduledWork  # noqa: E402
from llmco2_serve.gpu_energy import (  # noqa: E402
    FakeEnergyReader,
    ManualClock,
    NvmlEnergyReader,
)

# A counter that does not change for this long while polled is broken: stop rather than hang.
_STALL_S = 5.0

# Matmul size n (n x n @ n x n, bf16) and repetitions per step: FLOPs 1:1:2:4, and the first two
# have equal FLOPs with different kernel sizes (small kernels draw less power per FLOP/s).
DEFAULT_WORKLOADS: tuple[tuple[int, int], ...] = ((2048, 32), (4096, 4), (4096, 8), (8192, 2))

# Dry-run power model: throughput per matmul size (FLOP/s) and joules per FLOP.
_DRY_THROUGHPUT_FLOP_S = {2048: 300e12, 4096: 500e12, 8192: 600e12}
_DRY_ENERGY_PER_FLOP_J = 700.0 / 600e12  # 8192 runs at 700 W
_DRY_IDLE_POWER_W = 70.0
_DRY_HOST_GAP_S = 5e-5


@dataclass(frozen=True)
class Workload:
    """One kind of synthetic request: ``reps`` matmuls of size ``n`` per step."""

    name: str
    n: int
    reps: int

    @property
    def flops_per_step(self) -> float:
        return 2.0 * self.n**3 * self.reps


# --------------------------------------------------------------------------------------------
# Backends: the same protocol for the GPU and the simulated GPU
# --------------------------------------------------------------------------------------------
class _RecordingReader:
    """Delegates to a reader and keeps its first and latest values (for conservation)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.source = inner.source
        self.update_period_s = inner.update_period_s
        self.first_mj: list[int] | None = None
        self.last_mj: list[int] | None = None

    def device_names(self) -> list[str]:
        return self._inner.device_names()

    def energy_mj(self) -> list[int]:
        v = self._inner.energy_mj()
        if self.first_mj is None:
            self.first_mj = list(v)
        self.last_mj = list(v)
        return v

    def close(self) -> None:
        self._inner.close()


class GpuBackend:
    """bf16 matmuls on cuda:0, NVML through NvmlEnergyReader([0])."""

    mode = "gpu"

    def __init__(self, workloads: Sequence[Workload]) -> None:
        import torch  # only here: the dry run and the tests must not need CUDA

        if not torch.cuda.is_available():
            raise SystemExit(
                "gpu_attribution_check: CUDA is not available; run on a GPU machine or pass "
                "--dry-run"
            )
        self._torch = torch
        dev = torch.device("cuda:0")
        gen = torch.Generator(device=dev).manual_seed(0)
        self._mats: dict[int, tuple[Any, Any, Any]] = {}
        for w in workloads:
            if w.n not in self._mats:
                a = torch.randn(w.n, w.n, device=dev, dtype=torch.bfloat16, generator=gen)
                b = torch.randn(w.n, w.n, device=dev, dtype=torch.bfloat16, generator=gen)
                self._mats[w.n] = (a, b, torch.empty_like(a))
        torch.cuda.synchronize()
        self.clock: Callable[[], float] = time.monotonic
        self._raw = NvmlEnergyReader([0])
        self.gpu_name = self._raw.device_names()[0]

    def make_reader(self) -> Any:
        return NvmlEnergyReader([0])

    def read_mj(self) -> int:
        return self._raw.energy_mj()[0]

    def run_work(self, w: Workload) -> None:
        a, b, c = self._mats[w.n]
        for _ in range(w.reps):
            self._torch.matmul(a, b, out=c)

    def sync(self) -> None:
        self._torch.cuda.synchronize()

    def sleep(self, s: float) -> None:
        time.sleep(s)

    def close(self) -> None:
        self._raw.close()


class DryBackend:
    """Simulated GPU: a power model integrated by FakeEnergyReader, on a ManualClock."""

    mode = "dry-run"

    def __init__(self, workloads: Sequence[Workload]) -> None:
        for w in workloads:
            if w.n not in _DRY_THROUGHPUT_FLOP_S:
                raise ValueError(f"dry run has no throughput for matmul size n={w.n}")
        self.clock = ManualClock(1000.0)
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._powers: list[float] = []
        self._pending_s = 0.0  # work launched since the last sync (runs at sync, as on a GPU)
        self._pending: list[tuple[float, float]] = []
        self._raw = self.make_reader()
        self.gpu_name = "cuda:0 simulated GPU (dry run)"

    def _power_w(self, t: float) -> float:
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0 and t < self._ends[i]:
            return self._powers[i]
        return _DRY_IDLE_POWER_W

    def make_reader(self) -> Any:
        return FakeEnergyReader(
            self._power_w, clock=self.clock, update_period_s=0.1, integration_step_s=1e-3
        )

    def read_mj(self) -> int:
        return self._raw.energy_mj()[0]

    def run_work(self, w: Workload) -> None:
        thr = _DRY_THROUGHPUT_FLOP_S[w.n]
        self._pending.append((w.flops_per_step / thr, _DRY_ENERGY_PER_FLOP_J * thr))

    def sync(self) -> None:
        for dur, p in self._pending:
            t = self.clock()
            self._starts.append(t)
            self._ends.append(t + dur)
            self._powers.append(p)
            self.clock.advance(dur)
        self._pending.clear()
        self.clock.advance(_DRY_HOST_GAP_S)

    def sleep(self, s: float) -> None:
        self.clock.advance(s)

    def close(self) -> None:
        self._raw.close()


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
class _ChangeLog:
    """Times at which the polled counter changed (for the update period)."""

    def __init__(self) -> None:
        self.gaps_s: list[float] = []
        self._last_t: float | None = None
        self._last_v: int | None = None

    def see(self, t: float, v: int) -> bool:
        changed = self._last_v is not None and v != self._last_v
        if changed:
            if self._last_t is not None:
                self.gaps_s.append(t - self._last_t)
            self._last_t = t
        elif self._last_v is None:
            self._last_t = None
        self._last_v = v
        return changed

    def reset_origin(self) -> None:
        """Forget the latest change time (the next gap would span unpolled time)."""
        self._last_t = None
        self._last_v = None


def measure_idle_power_w(be: Any, seconds: float, log: _ChangeLog, poll_s: float = 0.002) -> dict:
    """Counter slope between the first and last change seen while idle, watts."""
    be.sync()
    log.reset_origin()
    t_end = be.clock() + seconds
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    while be.clock() < t_end:
        be.sleep(poll_s)
        t, v = be.clock(), be.read_mj()
        if log.see(t, v):
            if first is None:
                first = (t, v)
            last = (t, v)
    log.reset_origin()
    if first is None or last is None or last[0] <= first[0]:
        raise RuntimeError(f"the energy counter did not change twice in {seconds} s of idling")
    return {
        "power_w": (last[1] - first[1]) * 1e-3 / (last[0] - first[0]),
        "window_s": last[0] - first[0],
    }


def _check_stall(t: float, t_last_change: float) -> None:
    if t - t_last_change > _STALL_S:
        raise RuntimeError(f"the energy counter did not change for {_STALL_S} s under load")


def _step(be: Any, works: Sequence[Workload]) -> tuple[float, float]:
    t0 = be.clock()
    for w in works:
        be.run_work(w)
    be.sync()
    return t0, be.clock()


def measure_alone(be: Any, w: Workload, seconds: float, log: _ChangeLog) -> dict:
    """One pass of ``w`` alone, from one counter change to another at least ``seconds`` later."""
    t_warm = be.clock() + min(0.3, 0.1 * seconds)
    while be.clock() < t_warm:  # steady clocks/power before the window opens
        _step(be, [w])
    log.reset_origin()
    log.see(be.clock(), be.read_mj())
    t_last = be.clock()
    while True:
        _step(be, [w])
        t, v = be.clock(), be.read_mj()
        if log.see(t, v):
            t_a, e_a = t, v
            break
        _check_stall(t, t_last)
    n = 0
    t_last = t_a
    while True:
        _step(be, [w])
        n += 1
        t, v = be.clock(), be.read_mj()
        if log.see(t, v):
            t_last = t
            if t - t_a >= seconds:
                t_b, e_b = t, v
                break
        _check_stall(t, t_last)
    log.reset_origin()
    e_j = (e_b - e_a) * 1e-3
    return {"energy_j": e_j, "window_s": t_b - t_a, "n_steps": n}


def alone_summary(passes: Sequence[dict], idle_power_w: float) -> dict:
    """Per-step energy of a workload run alone, from its passes (see module docstring)."""
    e_steps = [p["energy_j"] / p["n_steps"] for p in passes]
    taus = [p["window_s"] / p["n_steps"] for p in passes]
    e_step = statistics.fmean(e_steps)
    tau = statistics.fmean(taus)
    return {
        "energy_per_step_j": e_step,
        "energy_per_step_spread_j": (max(e_steps) - min(e_steps)) / 2.0,
        "time_per_step_s": tau,
        "dynamic_energy_per_step_j": e_step - idle_power_w * tau,
        "power_w": statistics.fmean(p["energy_j"] / p["window_s"] for p in passes),
        "passes": list(passes),
    }


# --------------------------------------------------------------------------------------------
# Phase A schedule
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    """A request instance: workload ``k`` active in ``[start_s, end_s)`` of phase A."""

    request_id: str
    k: int
    start_s: float
    end_s: float


def make_schedule(n_workloads: int, duration_s: float, seed: int = 0) -> list[Instance]:
    """Staggered joins/leaves per workload, plus one gap in the middle where nothing runs."""
    rng = random.Random(seed)
    gap = (0.5 * duration_s - max(0.25, 0.01 * duration_s),
           0.5 * duration_s + max(0.25, 0.01 * duration_s))
    out: list[Instance] = []
    for k in range(n_workloads):
        t = rng.uniform(0.0, 0.12) * duration_s
        j = 0
        while t < 0.95 * duration_s:
            end = min(t + rng.uniform(0.2, 0.4) * duration_s, duration_s)
            for a, b in ((t, min(end, gap[0])), (max(t, gap[1]), end)):
                if b - a >= 0.05 * duration_s:
                    out.append(Instance(f"w{k}-{j}", k, a, b))
                    j += 1
            t = end + rng.uniform(0.03, 0.08) * duration_s
    return sorted(out, key=lambda r: (r.start_s, r.k))


@dataclass(frozen=True)
class AttributorConfig:
    name: str
    weights: tuple[float, ...]  # per workload
    step_split: str


def run_phase_a(
    be: Any,
    workloads: Sequence[Workload],
    schedule: Sequence[Instance],
    configs: Sequence[AttributorConfig],
    duration_s: float,
    idle_poll_s: float = 0.005,
    tail_s: float = 1.5,
) -> dict:
    """Run the schedule; every attributor sees the same steps. Returns results per config."""
    readers = [_RecordingReader(be.make_reader()) for _ in configs]
    atts = [
        EnergyAttributor(r, clock=be.clock, step_split=c.step_split)  # type: ignore[arg-type]
        for r, c in zip(readers, configs)
    ]
    t_start = be.clock()
    active: dict[str, Instance] = {}
    todo = list(schedule)
    n_steps: dict[str, int] = {}
    first_answer: list[dict[str, MeasuredEnergy]] = [{} for _ in configs]
    n_batch_steps = n_idle_polls = 0
    while True:
        now = be.clock() - t_start
        if now >= duration_s:
            break
        for rid, inst in list(active.items()):
            if now >= inst.end_s:
                del active[rid]
                for i, att in enumerate(atts):
                    first_answer[i][rid] = att.on_finished(rid)
        while todo and todo[0].start_s <= now:
            inst = todo.pop(0)
            if inst.end_s > now:
                active[inst.request_id] = inst
        if not active:
            be.sleep(idle_poll_s)
            for att in atts:
                att.poll()
            n_idle_polls += 1
            continue
        insts = list(active.values())
        t0, t1 = _step(be, [workloads[r.k] for r in insts])
        n_batch_steps += 1
        for i, att in enumerate(atts):
            w = configs[i].weights
            att.on_step(t0, t1, [
                ScheduledWork(r.request_id, "prefill" if n_steps.get(r.request_id, 0) == 0
                              else "decode", 1, n_steps.get(r.request_id, 0), w[r.k])
                for r in insts
            ])
        for r in insts:
            n_steps[r.request_id] = n_steps.get(r.request_id, 0) + 1
    for rid in list(active):
        for i, att in enumerate(atts):
            first_answer[i][rid] = att.on_finished(rid)
    finals: list[dict[str, MeasuredEnergy]] = [{} for _ in configs]
    t_tail = be.clock() + tail_s
    while be.clock() < t_tail:  # idle polls close the last windows
        be.sleep(idle_poll_s)
        for i, att in enumerate(atts):
            att.poll()
            for m in att.pop_finalized():
                finals[i][m.request_id] = m
        if all(len(f) == len(first_answer[i]) for i, f in enumerate(finals)):
            break
    out = {}
    for i, (c, att, rd) in enumerate(zip(configs, atts, readers)):
        results = {rid: finals[i].get(rid, m) for rid, m in first_answer[i].items()}
        counter_delta_j = (
            (rd.last_mj[0] - rd.first_mj[0]) * 1e-3 if rd.first_mj and rd.last_mj else math.nan
        )
        out[c.name] = {
            "results": results,
            "total_j": att.total_energy_j,
            "idle_j": att.idle_energy_j,
            "attributed_j": att.attributed_energy_j,
            "counter_delta_j": counter_delta_j,
            "source": att.source,
            "failure_reason": att.failure_reason,
        }
        rd.close()
    out["_meta"] = {"n_steps": n_steps, "n_batch_steps": n_batch_steps,
                    "n_idle_polls": n_idle_polls, "wall_s": be.clock() - t_start}
    return out


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------
def _rel(a: float, b: float) -> float:
    return (a - b) / b if b != 0 else math.nan


def compare(
    phase_a: dict, schedule: Sequence[Instance], workloads: Sequence[Workload],
    alone: Sequence[dict], idle_power_w: float, configs: Sequence[AttributorConfig],
) -> dict:
    """Per-instance and per-workload tables, conservation and additivity per config."""
    n_steps = phase_a["_meta"]["n_steps"]
    out: dict[str, Any] = {}
    for c in configs:
        pa = phase_a[c.name]
        rows = []
        for inst in schedule:
            m = pa["results"].get(inst.request_id)
            if m is None:
                continue
            k, n = inst.k, n_steps.get(inst.request_id, 0)
            a = alone[k]
            exp_total = n * a["energy_per_step_j"]
            exp_dyn = n * a["dynamic_energy_per_step_j"]
            idle_share = idle_power_w * n * a["time_per_step_s"]
            truth_u = n * a["energy_per_step_spread_j"]
            err = m.energy_j - exp_total
            err_dyn = (m.energy_j - idle_share) - exp_dyn
            rows.append({
                "request_id": inst.request_id, "workload": workloads[k].name, "n_steps": n,
                "attributed_j": m.energy_j, "uncertainty_j": m.uncertainty_j,
                "final": m.final, "estimated_j": m.estimated_energy_j,
                "expected_total_j": exp_total, "expected_total_spread_j": truth_u,
                "error_j": err, "rel_error": _rel(m.energy_j, exp_total),
                "within_uncertainty": abs(err) <= m.uncertainty_j,
                "within_combined": abs(err) <= math.hypot(m.uncertainty_j, truth_u),
                "attributed_dynamic_j": m.energy_j - idle_share, "expected_dynamic_j": exp_dyn,
                "rel_error_dynamic": _rel(m.energy_j - idle_share, exp_dyn),
                "within_uncertainty_dynamic": abs(err_dyn) <= m.uncertainty_j,
            })
        per_w = []
        for k, w in enumerate(workloads):
            rk = [r for r in rows if r["workload"] == w.name]
            if not rk:
                continue
            att = sum(r["attributed_j"] for r in rk)
            u = sum(r["uncertainty_j"] for r in rk)  # correlated: add linearly (upper scale)
            exp = sum(r["expected_total_j"] for r in rk)
            exp_dyn = sum(r["expected_dynamic_j"] for r in rk)
            att_dyn = sum(r["attributed_dynamic_j"] for r in rk)
            per_w.append({
                "workload": w.name, "n_instances": len(rk), "attributed_j": att,
                "uncertainty_j": u, "expected_total_j": exp, "rel_error": _rel(att, exp),
                "within_uncertainty": abs(att - exp) <= u,
                "rel_error_dynamic": _rel(att_dyn, exp_dyn),
            })
        conservation_err = pa["attributed_j"] + pa["idle_j"] - pa["counter_delta_j"]
        sum_exp = sum(r["expected_total_j"] for r in rows)
        abs_rel = [abs(r["rel_error"]) for r in rows if math.isfinite(r["rel_error"])]
        abs_rel_dyn = [abs(r["rel_error_dynamic"]) for r in rows
                       if math.isfinite(r["rel_error_dynamic"])]
        out[c.name] = {
            "step_split": c.step_split,
            "weights": list(c.weights),
            "source": pa["source"],
            "failure_reason": pa["failure_reason"],
            "requests": rows,
            "workloads": per_w,
            "conservation": {
                "attributed_j": pa["attributed_j"], "idle_j": pa["idle_j"],
                "total_j": pa["total_j"], "counter_delta_j": pa["counter_delta_j"],
                "error_j": conservation_err,
                "holds": abs(conservation_err) <= 1e-6 * max(1.0, abs(pa["counter_delta_j"])),
            },
            "additivity": {
                # > 0: the batched GPU drew more than the alone runs predict.
                "attributed_j": pa["attributed_j"], "sum_expected_total_j": sum_exp,
                "rel_error": _rel(pa["attributed_j"], sum_exp),
            },
            "summary": {
                "n_requests": len(rows),
                "n_within_uncertainty": sum(r["within_uncertainty"] for r in rows),
                "n_within_combined": sum(r["within_combined"] for r in rows),
                "n_final": sum(r["final"] for r in rows),
                "median_abs_rel_error": statistics.median(abs_rel) if abs_rel else math.nan,
                "max_abs_rel_error": max(abs_rel) if abs_rel else math.nan,
                "median_abs_rel_error_dynamic": (
                    statistics.median(abs_rel_dyn) if abs_rel_dyn else math.nan),
                "median_rel_uncertainty": statistics.median(
                    r["uncertainty_j"] / r["attributed_j"] for r in rows) if rows else math.nan,
            },
        }
    return out


def _period_stats(gaps: Sequence[float]) -> dict:
    if not gaps:
        return {"n": 0, "median_s": math.nan, "p10_s": math.nan, "p90_s": math.nan}
    s = sorted(gaps)
    return {"n": len(s), "median_s": statistics.median(s), "p10_s": s[len(s) // 10],
            "p90_s": s[(9 * len(s)) // 10]}


def format_report(rep: dict) -> str:
    lines = [
        f"gpu_attribution_check ({rep['mode']}) on {rep['gpu_name']}",
        f"idle power: {rep['idle']['power_w']:.1f} W (before {rep['idle']['before']['power_w']:.1f}"
        f" W, after {rep['idle']['after']['power_w']:.1f} W)",
        f"counter update period: median {rep['update_period']['median_s'] * 1e3:.1f} ms "
        f"(p10 {rep['update_period']['p10_s'] * 1e3:.1f}, p90 "
        f"{rep['update_period']['p90_s'] * 1e3:.1f}, n={rep['update_period']['n']})",
        f"phase A: {rep['phase_a']['duration_s']:.1f} s, {rep['phase_a']['n_batch_steps']} "
        f"steps, {rep['phase_a']['n_instances']} request instances",
        "",
        "alone (phase B):  workload  GFLOP/step  J/step(total)  +-spread  J/step(dyn)  ms/step  W",
    ]
    for w, a in zip(rep["workloads"], rep["alone"]):
        lines.append(
            f"  {w['name']:>24} {w['flops_per_step'] / 1e9:10.1f} {a['energy_per_step_j']:14.4f}"
            f" {a['energy_per_step_spread_j']:9.4f} {a['dynamic_energy_per_step_j']:12.4f}"
            f" {a['time_per_step_s'] * 1e3:8.3f} {a['power_w']:6.1f}"
        )
    for name, res in rep["attribution"].items():
        s, c, ad = res["summary"], res["conservation"], res["additivity"]
        lines += [
            "",
            f"== attributor '{name}' (step_split={res['step_split']}, source={res['source']})",
            f"conservation: attributed {c['attributed_j']:.3f} + idle {c['idle_j']:.3f} = "
            f"{c['attributed_j'] + c['idle_j']:.3f} J vs counter delta {c['counter_delta_j']:.3f}"
            f" J -> {'OK' if c['holds'] else 'FAILS'} (error {c['error_j']:.2e} J)",
            f"additivity: attributed {ad['attributed_j']:.2f} J vs sum of alone expectations "
            f"{ad['sum_expected_total_j']:.2f} J ({ad['rel_error'] * 100:+.1f}%)",
            f"within uncertainty: {s['n_within_uncertainty']}/{s['n_requests']} "
            f"(with truth spread: {s['n_within_combined']}), final {s['n_final']}; "
            f"median |rel err| {s['median_abs_rel_error'] * 100:.2f}% (max "
            f"{s['max_abs_rel_error'] * 100:.2f}%), dynamic-only "
            f"{s['median_abs_rel_error_dynamic'] * 100:.2f}%; median u/E "
            f"{s['median_rel_uncertainty'] * 100:.2f}%",
            "  request   steps  attributed_J  +-u_J     expected_J  rel_err  in_u  "
            "dyn_attr_J  dyn_exp_J  dyn_rel_err",
        ]
        for r in res["requests"]:
            lines.append(
                f"  {r['request_id']:<8} {r['n_steps']:6d} {r['attributed_j']:12.3f} "
                f"{r['uncertainty_j']:7.3f} {r['expected_total_j']:12.3f} "
                f"{r['rel_error'] * 100:+7.2f}% {'yes' if r['within_uncertainty'] else 'NO':>4} "
                f"{r['attributed_dynamic_j']:11.3f} {r['expected_dynamic_j']:10.3f} "
                f"{r['rel_error_dynamic'] * 100:+8.2f}%"
            )
        lines.append("  per workload: " + "; ".join(
            f"{w['workload']} {w['rel_error'] * 100:+.2f}% (u {w['uncertainty_j']:.2f} J, "
            f"{'in' if w['within_uncertainty'] else 'OUT'})" for w in res["workloads"]))
    lines.append(f"\nruntime {rep['runtime_s']:.1f} s wall")
    return "\n".join(lines) + "\n"


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def run_check(
    be: Any, workloads: Sequence[Workload], duration_s: float, alone_s: float, idle_s: float,
    seed: int = 0,
) -> dict:
    wall0 = time.monotonic()
    log = _ChangeLog()
    idle_before = measure_idle_power_w(be, idle_s, log)
    t_warm = be.clock() + (3.0 if be.mode == "gpu" else 0.5)
    while be.clock() < t_warm:  # clocks and temperature up before the alone windows
        _step(be, workloads)
    passes: list[list[dict]] = [[] for _ in workloads]
    order = list(range(len(workloads)))
    for seq in (order, order[::-1]):
        for k in seq:
            passes[k].append(measure_alone(be, workloads[k], alone_s / 2.0, log))
    be.sleep(1.0 if be.mode == "gpu" else 0.0)
    # Idle right after work is warmer than cold idle: measure both and use the mean.
    idle_after = measure_idle_power_w(be, idle_s, log)
    idle_w = 0.5 * (idle_before["power_w"] + idle_after["power_w"])
    alone = [alone_summary(p, idle_w) for p in passes]
    flops = tuple(w.flops_per_step for w in workloads)
    oracle = tuple(a["energy_per_step_j"] for a in alone)
    configs = [
        AttributorConfig("flops", flops, "duration"),
        AttributorConfig("oracle", oracle, "duration"),
        AttributorConfig("oracle_weight_split", oracle, "weight"),
    ]
    schedule = make_schedule(len(workloads), duration_s, seed)
    phase_a = run_phase_a(be, workloads, schedule, configs, duration_s)
    attribution = compare(phase_a, schedule, workloads, alone, idle_w, configs)
    meta = phase_a["_meta"]
    return {
        "mode": be.mode,
        "gpu_name": be.gpu_name,
        "workloads": [dict(asdict(w), flops_per_step=w.flops_per_step) for w in workloads],
        "config": {"duration_s": duration_s, "alone_s": alone_s, "idle_s": idle_s, "seed": seed,
                   "attributor_update_period_s": NvmlEnergyReader.update_period_s},
        "idle": {"power_w": idle_w, "before": idle_before, "after": idle_after},
        "update_period": _period_stats(log.gaps_s),
        "alone": alone,
        "phase_a": {"duration_s": meta["wall_s"], "n_batch_steps": meta["n_batch_steps"],
                    "n_idle_polls": meta["n_idle_polls"], "n_instances": len(schedule),
                    "schedule": [asdict(s) for s in schedule]},
        "attribution": attribution,
        "runtime_s": time.monotonic() - wall0,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./gpu-check-out")
    p.add_argument("--duration-s", type=float, default=None,
                   help="phase A (interleaved) length; default 60 (20 with --dry-run)")
    p.add_argument("--alone-s", type=float, default=6.0,
                   help="alone time per workload, in two passes (default 6)")
    p.add_argument("--idle-s", type=float, default=3.0, help="each idle measurement (default 3)")
    p.add_argument("--scale", type=int, default=1, help="multiply every workload's reps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="simulated GPU on the CPU (FakeEnergyReader + ManualClock)")
    args = p.parse_args(argv)
    duration_s = args.duration_s if args.duration_s is not None else (
        20.0 if args.dry_run else 60.0)
    if not (duration_s > 0 and args.alone_s > 0 and args.idle_s > 0 and args.scale >= 1):
        p.error("--duration-s, --alone-s, --idle-s must be > 0 and --scale >= 1")
    workloads = [Workload(f"mm{n}x{r * args.scale}", n, r * args.scale)
                 for n, r in DEFAULT_WORKLOADS]
    be = DryBackend(workloads) if args.dry_run else GpuBackend(workloads)
    try:
        rep = run_check(be, workloads, duration_s, args.alone_s, args.idle_s, args.seed)
    finally:
        be.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(rep)
    (out / "report.json").write_text(json.dumps(_json_safe(rep), indent=1))
    (out / "report.txt").write_text(text)
    print(text, end="")
    print(f"wrote {out / 'report.json'} and {out / 'report.txt'}")
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
