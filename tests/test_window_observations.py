"""Counter windows as calibration observations (issue 7 §2; runtime/windows.py).

Truths from outside the code under test:

* the fake NVML counters (``FakeNvml``: a power function of time, integrated exactly, updated
  every period with offset phases per device) and a step power model of the test's own: a step
  draws idle power plus a dynamic power per prefill token and per decode row. Each step is given a
  *prediction* equal to its true energy divided by known factors (prefill 2.0, decode 0.7), so
  every merged observation must satisfy ``measured = 2.0 x predicted prefill + 0.7 x predicted
  decode`` up to its declared uncertainty, and a calibrator fed only with windows must find those
  factors;
* the GNN's own request prediction (``Predictor.predict_many`` / b, what the API server's table
  interpolates) for the scale of the engine-side step prediction.
"""

from __future__ import annotations

import bisect
import math
import random

import numpy as np
import pytest

from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock
from llmco2_serve.prediction.calibration import Calibrator, DeploymentKey
from llmco2_serve.runtime.attribution import EnergyAttributor
from llmco2_serve.runtime.windows import WindowAggregator, WindowObservation, observe_windows

KEY = DeploymentKey(model="m", gpu="g", n_gpu=1, tensor_parallel=1, pipeline_parallel=1, dtype="bf16", engine="e",
                    predictor="gnn 1")
F_PREFILL, F_DECODE = 2.0, 0.7  # true energy / predicted energy, per phase
P_IDLE_W = 80.0


def _schedule(seed: int, duration_s: float = 30.0):
    """Steps (start, end, rows, prefill rows, true prefill J, true decode J): bursts of work with
    idle gaps; the power model is the test's own."""
    rng = random.Random(seed)
    t, steps = 0.05, []
    regime, regime_end = (0,), 0.0
    while t < duration_s:
        if t >= regime_end:  # arrivals come in bursts: decode-only, mixed and prefill-heavy stretches
            regime, regime_end = rng.choice(((0,), (0, 0, 0, 1, 2), (1, 2, 3))), t + rng.uniform(0.5, 2.0)
        if rng.random() < 0.08:  # an idle gap (long enough for fully idle windows)
            t += rng.uniform(0.2, 0.6)
        dur = rng.uniform(0.008, 0.04)
        rows = rng.randint(4, 48)
        n_pre = rng.choice(regime)
        dyn_pre = n_pre * rng.uniform(150.0, 300.0)  # W: compute-bound chunks draw more
        dyn_dec = (rows - n_pre) * 4.0
        static = P_IDLE_W * dur
        e_pre = dyn_pre * dur + static * n_pre / rows
        e_dec = dyn_dec * dur + static * (rows - n_pre) / rows
        steps.append((t, t + dur, rows, n_pre, e_pre, e_dec))
        t += dur + rng.uniform(0.0, 0.002)
    return steps


def _power(steps):
    starts = [s[0] for s in steps]

    def p(t: float) -> float:
        i = bisect.bisect_right(starts, t) - 1
        if i >= 0 and t < steps[i][1]:
            s = steps[i]
            return (s[4] + s[5]) / (s[1] - s[0])
        return P_IDLE_W
    return p


def _drive(steps, n_devices=1, period_s=0.1, predicted=lambda i: True, min_span_s=0.5, max_kept=4096):
    clock = ManualClock()
    p = _power(steps)
    share = 1.0 / n_devices  # TP ranks share the work: each draws 1/n of the power
    reader = FakeEnergyReader([lambda t: share * p(t)] * n_devices, clock=clock, update_period_s=period_s,
                              phase_s=[period_s * d / n_devices for d in range(n_devices)])
    att = EnergyAttributor(reader, clock)
    agg = att.collect_windows(min_span_s=min_span_s, max_kept=max_kept)
    for i, (t0, t1, rows, n_pre, e_pre, e_dec) in enumerate(steps):
        while clock() + 0.1 < t0:  # the idle poller
            clock.advance(0.1)
            att.poll()
        clock.set(t1)
        ids = [f"r{i}-{k}" for k in range(rows)]
        pre = [k < n_pre for k in range(rows)]
        att.record_step(t0, t1, ids, pre, [1.0] * rows,
                        predicted_j=(e_pre / F_PREFILL, e_dec / F_DECODE) if predicted(i) else None)
        for rid in set(ids):
            att.on_finished(rid)
    clock.advance(0.5)
    att.poll()
    return att, agg, reader


@pytest.mark.parametrize("n_devices", [1, 4])
def test_merged_windows_agree_with_the_counters_within_their_uncertainty(n_devices):
    steps = _schedule(seed=n_devices)
    att, agg, reader = _drive(steps, n_devices=n_devices)
    obs = agg.pop(10_000)
    assert len(obs) >= 30
    assert agg.dropped == 0 and agg.skipped == 0
    z, rel_u = [], []
    for o in obs:
        assert o.span_s >= 0.5 and o.windows >= 1
        truth = F_PREFILL * o.predicted_prefill_j + F_DECODE * o.predicted_decode_j
        z.append(abs(o.measured_j - truth) / o.uncertainty_j)
        rel_u.append(o.uncertainty_j / o.measured_j)
        assert 4.0 <= o.batch <= 48.0
    z.sort()
    # declared uncertainty is an error scale: most within it, nearly all within 3x
    assert z[len(z) // 2] <= 1.0 and z[int(0.95 * len(z))] <= 3.0, z
    # and it is not vacuous: merged windows are far more precise than one 100 ms window (~100 %)
    assert sorted(rel_u)[len(rel_u) // 2] < 0.35, rel_u
    # everything the counters measured as busy went into observations (or the last one still open),
    # and that is the steps' true energy up to the observations' own uncertainty (the end of a burst
    # leaks into the following idle window: the attributor's boundary term, counted in them)
    measured = sum(o.measured_j for o in obs) + agg._measured
    assert measured == pytest.approx(att.attributed_energy_j, rel=1e-9)
    true_busy = sum(s[4] + s[5] for s in steps)
    assert abs(measured - true_busy) <= sum(o.uncertainty_j for o in obs), (measured, true_busy)
    assert measured == pytest.approx(true_busy, rel=0.05)
    # each device gets 1/n of the steps' prediction: the predictions add up to the steps' once
    predicted = sum(o.predicted_prefill_j + o.predicted_decode_j for o in obs) + agg._pred_p + agg._pred_d
    expected = sum(s[4] / F_PREFILL + s[5] / F_DECODE for s in steps)
    assert predicted == pytest.approx(expected, rel=0.01)


def test_a_calibrator_fed_only_with_windows_learns_the_phase_factors():
    steps = _schedule(seed=7, duration_s=60.0)
    _, agg, _ = _drive(steps, n_devices=2)
    cal = Calibrator(KEY)
    rows = [o.to_row() for o in agg.pop(10_000)]
    ok, bad = observe_windows(cal, {"source": "fake", "predictor": "gnn 1", "rows": rows})
    # (a window of a few steps between idle gaps may be as uncertain as it is large: counted, not learnt)
    assert ok >= 60 and bad <= 0.05 * ok and set(cal.rejected) <= {"window:too_uncertain"}, cal.rejected
    assert cal.by_kind == {"request": 0, "window": ok}
    fp, fd = cal.factors(batch=16)
    assert fp == pytest.approx(F_PREFILL, rel=0.1) and fd == pytest.approx(F_DECODE, rel=0.1), (fp, fd)


def test_windows_with_steps_that_had_no_prediction_are_not_used():
    steps = _schedule(seed=3, duration_s=10.0)
    # the predictor arrives after 4 s (engine start-up): windows before it hold unpredicted steps
    _, agg, _ = _drive(steps, predicted=lambda i: steps[i][0] > 4.0)
    obs = agg.pop(10_000)
    assert agg.skipped > 0 and obs
    for o in obs:  # none of them mixes in the unpredicted steps' energy
        truth = F_PREFILL * o.predicted_prefill_j + F_DECODE * o.predicted_decode_j
        assert abs(o.measured_j - truth) <= 3.0 * o.uncertainty_j


def test_observations_wait_bounded_and_leave_a_few_per_message():
    agg = WindowAggregator(min_span_s=0.0, max_kept=5)
    for k in range(8):
        agg.add(0, k + 1, 0.1 * k, 0.1 * (k + 1), 1.0, 0.01, 0.01, 0.0, 0.5, 0.5, 2, 8.0)
    assert agg.emitted == 8 and agg.dropped == 3 and agg.waiting == 5
    first = agg.pop(2)
    assert len(first) == 2 and agg.waiting == 3
    assert len(agg.pop(16)) == 3 and agg.pop(16) == []
    row = first[0].to_row()
    assert len(row) == 7 and row[4] == 4.0  # batch: 8 rows over 2 steps


def test_consecutive_windows_merge_and_their_interior_boundaries_cancel():
    agg = WindowAggregator(min_span_s=1.0)
    for k in range(10):  # ten adjacent 0.1 s windows of one device, boundary scale 0.05 J each
        agg.add(0, k + 1, 0.1 * k, 0.1 * (k + 1) + 1e-9, 1.0, 0.05, 0.05, 0.0, 0.4, 0.6, 5, 40.0)
    (o,) = agg.pop()
    assert o.windows == 10 and o.measured_j == pytest.approx(10.0)
    assert o.uncertainty_j == pytest.approx(math.sqrt(2) * 0.05)  # only the two ends
    assert o.predicted_prefill_j == pytest.approx(4.0) and o.batch == 8.0
    agg2 = WindowAggregator(min_span_s=1.0)
    for k in range(0, 20, 2):  # every other window (idle ones between, not counted): no boundary is interior
        agg2.add(0, k + 1, 0.1 * k, 0.1 * (k + 1), 1.0, 0.05, 0.05, 0.0, 0.4, 0.6, 5, 40.0)
    (o2,) = agg2.pop()
    assert o2.uncertainty_j == pytest.approx(math.sqrt(o2.windows * 2) * 0.05)


@pytest.mark.parametrize("source", ["cpu-estimate-codecarbon", "nvml-partial", "nvml-shared", "unavailable",
                                    "pending", None])
def test_only_real_counters_are_learnt_from(source):
    cal = Calibrator(KEY)
    row = WindowObservation(3.0, 0.1, 1.0, 1.0, 8.0, 0.6, 6).to_row()
    ok, bad = observe_windows(cal, {"source": source, "predictor": "gnn 1", "rows": [row] * 5})
    assert (ok, bad) == (0, 5) and cal.observations == 0
    assert cal.rejected == {f"source:{source}": 5}
    ok, _ = observe_windows(cal, {"source": "nvml", "predictor": "gnn 1", "rows": [row] * 5})
    assert ok == 5 and cal.by_kind["window"] == 5


def test_malformed_window_rows_are_counted_not_raised():
    cal = Calibrator(KEY)
    good = WindowObservation(3.0, 0.1, 1.0, 1.0, 8.0, 0.6, 6).to_row()
    rows = [good, [1, 2], ["x", 1, 1, 1, 1, 1, 1], None, good + [1], [float("nan")] + good[1:]]
    ok, bad = observe_windows(cal, {"source": "fake", "predictor": "gnn 1", "rows": rows})
    assert (ok, bad) == (1, 5)
    assert cal.rejected == {"window:malformed": 4, "not_finite": 1}
    assert observe_windows(cal, "nonsense") == (0, 0) and observe_windows(cal, {"rows": 3}) == (0, 0)


def test_windows_priced_by_other_weights_are_not_learnt_from():
    """After a hot reload the API server's calibrator corrects the new weights, while the engine
    core still prices its steps with the weights it started with."""
    cal = Calibrator(KEY)
    row = WindowObservation(3.0, 0.1, 1.0, 1.0, 8.0, 0.6, 6).to_row()
    for label in ("gnn 0", None):
        assert observe_windows(cal, {"source": "nvml", "predictor": label, "rows": [row] * 3}) == (0, 3)
    assert cal.observations == 0 and cal.rejected == {"window:other_predictor": 6}


# ----------------------------------------------------------------------------- the scale
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "torch_dtype": "float32",
        "architectures": ["LlamaForCausalLM"]}
LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "architectures": ["LlamaForCausalLM"]}


def _engine_side_request_j(meter, scale, b: int, prompt: int, gen: int) -> tuple[float, float]:
    """b requests of one shape in lockstep, as vLLM runs them: one prefill step, gen - 1 decode
    steps; the per-step predicted energy summed and shared by b (prefill J, decode J)."""
    pre_rows = [(f"r{k}", "prefill", prompt, 0) for k in range(b)]
    w, _ = meter.weights_and_compute(pre_rows)
    p, d = scale.step_j([True] * b, np.asarray(w), np.full(b, float(prompt)), np.zeros(b))
    total_p, total_d = p + d, 0.0
    for j in range(gen - 1):
        rows = [(f"r{k}", "decode", 1, prompt + j) for k in range(b)]
        w, _ = meter.weights_and_compute(rows)
        p, d = scale.step_j([False] * b, np.asarray(w), np.ones(b), np.full(b, float(prompt + j)))
        total_d += p + d
    return total_p / b, total_d / b


@pytest.mark.parametrize("config,gpu", [(TINY, "H100"), (LLAMA_8B, "H100")])
def test_step_predictions_add_up_to_the_request_prediction(config, gpu):
    """The engine's per-step GNN joules, summed over a request's steps, against the API server's
    prediction for the same shape and batch (the GNN's batch energy / b): the calibrator corrects
    the latter with what it learns from the former."""
    from llmco2_serve.prediction.predictor import Predictor
    from llmco2_serve.runtime.engine_meter import EngineMeter

    pred = Predictor.from_config(config, gpu=gpu)
    meter = EngineMeter(FakeEnergyReader([300.0], clock=ManualClock()), pred)  # windows (and their pricing) need a measuring source
    scale = meter._scale
    assert scale is not None
    errs = []
    for b, prompt, gen in [(1, 64, 16), (1, 500, 100), (8, 200, 50), (32, 1000, 200), (64, 128, 32),
                           (4, 2000, 8), (16, 50, 400), (128, 300, 64)]:
        service = pred.predict_many(np.array([prompt]), np.array([gen]), batch=b)
        want_p = float(service.prefill_energy_j[0]) / b
        want_d = float(service.decode_energy_j[0]) / b
        got_p, got_d = _engine_side_request_j(meter, scale, b, prompt, gen)
        errs.append((b, prompt, gen, got_p / want_p - 1, got_d / want_d - 1,
                     (got_p + got_d) / (want_p + want_d) - 1))
    print("\n".join(f"b={b:4d} L={p:5d} G={g:4d}: prefill {ep:+.3f} decode {ed:+.3f} total {et:+.3f}"
                    for b, p, g, ep, ed, et in errs))
    worst_total = max(abs(e[5]) for e in errs)
    worst_phase = max(max(abs(e[3]), abs(e[4])) for e in errs)
    # measured (weights version 3, G_ref 128): 4.4 % / 4.8 % tiny, 3.0 % / 4.8 % llama-8b
    assert worst_total <= 0.05 and worst_phase <= 0.08, errs


def test_the_engine_meter_sends_windows_priced_in_gnn_joules_once_its_predictor_is_set():
    """An EngineMeter on the TEST-ONLY work counter: no observation before the predictor is set
    (rows weighted by tokens have no joules), then merged windows whose measured energy is the
    counter's own (its model: each step costs its work, idle power between steps)."""
    from llmco2_serve.hardware.gpu_energy import WorkFakeReader
    from llmco2_serve.prediction.predictor import Predictor
    from llmco2_serve.runtime.engine_meter import EngineMeter

    clock = ManualClock()
    reader = WorkFakeReader(idle_w=0.5, busy_w=50.0, update_period_s=0.05, clock=clock)
    meter = EngineMeter(reader, clock=clock)
    assert meter._windows.min_span_s == 0.5  # 5 periods of 50 ms are less than the 0.5 s floor

    def run(n_steps: int, key0: int) -> float:
        busy = 0.0
        for k in range(n_steps):
            rows = [(f"q{key0 + k}-{j}", "decode", 1, 100 + k) for j in range(6)]
            if k % 10 == 0:
                rows.append((f"p{key0 + k}", "prefill", 200, 0))
            meter.step_started(key0 + k, rows)
            clock.advance(0.015)
            busy += 0.015
            meter.step_finished(key0 + k)
            clock.advance(0.001)
        return busy

    def idle(s: float) -> None:
        for _ in range(int(s / 0.01)):
            clock.advance(0.01)
            meter.idle_tick(idle_after_s=0.0)

    run(200, 0)
    idle(0.3)
    assert meter.pop_windows(1000) == []  # no predictor yet: weights are token counts, no joules
    skipped = meter._windows.skipped
    assert skipped > 0
    meter.set_predictor(Predictor.from_config(TINY, gpu="H100"))
    assert meter.predictor_label and meter._scale is not None
    work0 = reader.work_energy_j
    run(400, 1000)
    idle(0.3)
    obs = meter.pop_windows(1000)
    assert len(obs) >= 8 and meter._windows.skipped == skipped
    for o in obs:
        assert o.predicted_prefill_j > 0 and o.predicted_decode_j > 0 and 6.0 <= o.batch <= 7.0
    measured = sum(o.measured_j for o in obs) + meter._windows._measured
    truth = reader.work_energy_j - work0  # the counter's model: a step costs its work, whatever its time
    assert measured == pytest.approx(truth, rel=0.01), (measured, truth)


def test_a_source_that_does_not_measure_collects_no_windows():
    # The calibrator refuses estimates (cpu-estimate) and "unavailable": the engine must not spend
    # poller time pricing windows nobody may learn from, nor send them (issue 7: only real measurements).
    from llmco2_serve.hardware.gpu_energy import NullEnergyReader
    from llmco2_serve.prediction.predictor import Predictor
    from llmco2_serve.runtime.engine_meter import EngineMeter

    pred = Predictor.from_config(TINY, gpu="H100")
    assert EngineMeter(NullEnergyReader(), pred)._scale is None
    assert EngineMeter(NullEnergyReader(), pred).pop_windows() == []
    assert EngineMeter(FakeEnergyReader([300.0], clock=ManualClock()), pred)._scale is not None
