"""Attribution of window energy to requests, driven by FakeEnergyReader with known power.

Expected values are computed by hand in the comments (or, for the long interleaved schedule,
by an independent reference loop over the same schedule).
"""

from __future__ import annotations

import bisect
import math
import random

import pytest

from llmco2_serve.runtime.attribution import EnergyAttributor, MeasuredEnergy, ScheduledWork
from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock, NullEnergyReader


def work(rid: str, phase: str = "decode", n: int = 1, ctx: int = 0, w: float = 1.0):
    return ScheduledWork(rid, phase, n, ctx, w)


def step(att: EnergyAttributor, clock: ManualClock, t0: float, t1: float, items) -> None:
    clock.set(round(t1, 9))
    att.on_step(round(t0, 9), round(t1, 9), items)


def poll_at(att: EnergyAttributor, clock: ManualClock, t: float) -> None:
    clock.set(round(t, 9))
    att.poll()


def make(power_w, **kw):
    clock = ManualClock(0.0)
    reader_kw = {k: kw.pop(k) for k in ("phase_s", "sampled_fraction") if k in kw}
    reader = FakeEnergyReader(power_w, clock=clock, update_period_s=0.1, **reader_kw)
    return clock, reader, EnergyAttributor(reader, clock=clock, **kw)


def assert_conserved(att: EnergyAttributor) -> None:
    total = att.attributed_energy_j + att.idle_energy_j
    assert total == pytest.approx(att.total_energy_j, abs=1e-9)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"phase": "generate"}, "phase"),
        ({"n_tokens": 0}, "n_tokens"),
        ({"context_len": -1}, "context_len"),
        ({"weight": 0.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
    ],
)
def test_scheduled_work_names_the_bad_field(kwargs, field):
    args = {"request_id": "a", "phase": "decode", "n_tokens": 1, "context_len": 0, "weight": 1.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        ScheduledWork(**args)


def test_constructor_validates_arguments():
    clock = ManualClock()
    reader = FakeEnergyReader(100.0, clock=clock)
    with pytest.raises(ValueError, match="step_split"):
        EnergyAttributor(reader, clock=clock, step_split="tokens")
    with pytest.raises(ValueError, match="idle_power_w"):
        EnergyAttributor(reader, clock=clock, idle_power_w=[1.0, 2.0])


# ------------------------------------------------------------------ single request
def test_single_request_windows_phase_split_and_uncertainty():
    clock, _, att = make(300.0)
    for i in range(10):  # 20 ms steps; the counter ticks at 0.1 and 0.2 (30 J each)
        item = work("a", "prefill", 50, 0, 5.0) if i == 0 else work("a", "decode", 1, 49 + i)
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [item])
    m = att.on_finished("a")
    assert m.final and m.source == "fake" and m.n_steps == 10
    assert m.prefill_energy_j == pytest.approx(6.0)  # 30 J * 0.02 s / 0.1 s
    assert m.decode_energy_j == pytest.approx(54.0)
    assert m.energy_j == pytest.approx(60.0) and m.estimated_energy_j == 0.0
    # boundaries: baseline (update period 0.1 s x 300 W = 30 J) and the last read gap
    # (0.02 s x 300 W = 6 J); the interior one cancels (the request holds all of both windows)
    assert m.uncertainty_j == pytest.approx(math.hypot(30.0, 6.0))
    assert att.pop_finalized() == [m]
    assert att.total_energy_j == pytest.approx(60.0)
    assert_conserved(att)


def test_on_finished_estimates_open_window_then_delivers_final():
    clock, _, att = make(300.0)
    for i in range(8):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a")])
    m = att.on_finished("a")  # at 0.16: window (0.1, 0.2] still open
    assert not m.final
    assert m.estimated_energy_j == pytest.approx(300.0 * 0.06)  # last window's 300 W x 60 ms
    assert m.energy_j == pytest.approx(30.0 + 18.0)
    assert m.uncertainty_j == pytest.approx(math.hypot(30.0, 6.0) + 18.0)  # open part: 100%
    assert att.pop_finalized() == []
    poll_at(att, clock, 0.2)  # closes (0.1, 0.2]: 30 J, 60 ms busy, 40 ms idle
    (final,) = att.pop_finalized()
    # idle floor = 300 W (only an upper bound): e_idle = min(300*0.04, 30*0.04/0.1) = 12 J
    assert final.final and final.energy_j == pytest.approx(48.0)
    # boundary 0.1: 6 J x (1 - 0.6 of window 2's energy); boundary 0.2: 0.04 s x 300 W x 0.6;
    # idle split only bounded (f = 1): 18 J x 12/18, plus resolution: its steps cover 0.06 s
    # of the 0.1 s update period, 18 J x 0.4
    terms = [30.0, 6.0 * (1 - 0.6), 12.0 * 0.6, 18.0 * 12.0 / 18.0 + 18.0 * 0.4]
    assert final.uncertainty_j == pytest.approx(math.sqrt(sum(x * x for x in terms)))
    assert att.idle_energy_j == pytest.approx(12.0)
    assert_conserved(att)


def test_reused_ledger_slots_start_from_zero():
    # 300 requests one after another, each alone on the device for one counter period (5 steps of
    # 20 ms at 300 W): each measures 30 J, whatever ran before it. The ledger's columns of
    # finished requests are reused (reset in batches when the free ones run out): anything an
    # earlier occupant left behind would show in the energy, the step count or the preemptions.
    clock, _, att = make(300.0)
    for i in range(300):
        rid = f"r{i}"
        for k in range(5):
            t0 = 0.1 * i + 0.02 * k
            item = work(rid, "prefill", 8, 0) if k == 0 else work(rid, "decode", 1, 7 + k)
            step(att, clock, t0, t0 + 0.02, [item])
            if k == 2 and i % 7 == 0:
                att.on_preempted(rid)
        m = att.on_finished(rid)
        assert m.final, i
        assert m.energy_j == pytest.approx(30.0), i
        assert m.prefill_energy_j == pytest.approx(6.0), i
        assert m.n_steps == 5 and m.mean_batch == pytest.approx(1.0), i
        assert m.n_preemptions == (1 if i % 7 == 0 else 0), i
    assert len(att.pop_finalized()) == 300
    assert att.live_requests == 0
    assert_conserved(att)


def test_idle_floor_gives_a_short_step_its_higher_power():
    busy = (0.23, 0.25)  # 400 W during the step, 100 W idle otherwise
    clock, _, att = make(lambda t: 400.0 if busy[0] <= t < busy[1] else 100.0)
    for k in range(1, 11):
        poll_at(att, clock, 0.02 * k)  # idle windows (0, 0.1], (0.1, 0.2]: 100 W each
    step(att, clock, 0.23, 0.25, [work("s", "prefill", 8, 0)])
    early = att.on_finished("s")
    assert not early.final and math.isnan(early.energy_j)  # no window with work closed yet
    for t in (0.27, 0.29, 0.31):
        poll_at(att, clock, t)
    (m,) = att.pop_finalized()
    # tick 0.3: E = 100*0.23 + 400*0.02 + 100*0.05 = 36 J -> window (0.2, 0.31] holds 16 J.
    # idle floor 100 W (from idle windows): e_idle = min(100*0.09, 16*0.09/0.11) = 9 J -> 7 J.
    # (time-proportional would give 16*0.02/0.11 = 2.9 J; truth is 8 J, 1 J fell after the tick)
    assert m.energy_j == pytest.approx(7.0) and m.prefill_energy_j == pytest.approx(7.0)
    # boundaries: 0.02 s x 100 W (idle window before) and 0.02 s x 16/0.11 W, each x q = 7/16;
    # idle split with known idle power: f = 0.25 of 9/7; resolution: 20 ms of a 100 ms period
    q = 7.0 / 16.0
    terms = [2.0 * q, 0.02 * 16.0 / 0.11 * q, 7.0 * 0.25 * 9.0 / 7.0 + 7.0 * 0.8]
    assert m.uncertainty_j == pytest.approx(math.sqrt(sum(x * x for x in terms)))
    assert m.uncertainty_j > m.energy_j  # shorter than the update period: of its own order
    assert abs(m.energy_j - 8.0) <= m.uncertainty_j
    assert att.idle_energy_j == pytest.approx(29.0) and att.total_energy_j == pytest.approx(36.0)


def test_known_idle_power_from_constructor():
    busy = (0.0, 0.02)
    clock, _, att = make(lambda t: 400.0 if busy[0] <= t < busy[1] else 100.0, idle_power_w=100.0)
    step(att, clock, 0.0, 0.02, [work("s")])
    for t in (0.04, 0.06, 0.08, 0.1):
        poll_at(att, clock, t)
    (m,) = [att.on_finished("s")]
    # window (0, 0.1]: 400*0.02 + 100*0.08 = 16 J; idle 100 W * 0.08 s = 8 J -> 8 J exact
    assert m.final and m.energy_j == pytest.approx(8.0)


# ------------------------------------------------------------------ several requests
def test_weights_one_to_three_split_one_to_three_per_phase():
    clock, _, att = make(400.0)
    for i in range(5):
        phase = "prefill" if i == 0 else "decode"
        step(att, clock, 0.02 * i, 0.02 * (i + 1),
             [work("a", phase, w=1.0), work("b", phase, w=3.0)])
    a, b = att.on_finished("a"), att.on_finished("b")
    # 40 J in the window, 8 J per step: a 2 J, b 6 J per step
    assert (a.prefill_energy_j, a.decode_energy_j) == pytest.approx((2.0, 8.0))
    assert (b.prefill_energy_j, b.decode_energy_j) == pytest.approx((6.0, 24.0))
    assert b.energy_j == pytest.approx(3 * a.energy_j)


def test_chunked_prefill_over_several_steps():
    clock, _, att = make(500.0)  # 50 ms steps: 25 J each, windows close every 2 steps
    a_items = [
        work("a", "prefill", 128, 0, 128.0),
        work("a", "prefill", 128, 128, 128.0),
        work("a", "prefill", 44, 256, 44.0),
        work("a", "decode", 1, 300, 1.0),
        work("a", "decode", 1, 301, 1.0),
        work("a", "decode", 1, 302, 1.0),
    ]
    for i, item in enumerate(a_items):
        step(att, clock, 0.05 * i, 0.05 * (i + 1), [item, work("b", "decode", 1, 10 + i, 2.0)])
    a, b = att.on_finished("a"), att.on_finished("b")
    assert a.prefill_energy_j == pytest.approx(25 * (128 / 130 + 128 / 130 + 44 / 46))
    assert a.decode_energy_j == pytest.approx(25 * 3 * (1 / 3))
    assert b.energy_j == pytest.approx(25 * (2 / 130 + 2 / 130 + 2 / 46 + 3 * 2 / 3))
    assert a.energy_j + b.energy_j == pytest.approx(150.0)
    assert (a.n_steps, b.n_steps) == (6, 6)


def test_step_split_by_weight_follows_predicted_step_energy():
    clock, _, att = make(300.0, step_split="weight")
    step(att, clock, 0.0, 0.05, [work("p", "prefill", 256, 0, 9.0)])  # predicted 9 J
    step(att, clock, 0.05, 0.1, [work("d", "decode", 1, 10, 3.0)])  # predicted 3 J
    p, d = att.on_finished("p"), att.on_finished("d")
    # 30 J split 9:3 between the steps although they last equally long
    assert (p.energy_j, d.energy_j) == pytest.approx((22.5, 7.5))


def test_preempted_request_phases_follow_the_rows_not_a_recompute_countdown():
    """Issue 6.7: a resumed request that hits the prefix cache recomputes only what missed it.
    The rows carry the phase by token position (hooks/engine_core.step_rows); the attributor
    must charge exactly that, whatever the preemption count says."""
    clock, _, att = make(100.0)  # 20 ms steps alone: 2 J each
    schedule = [
        work("a", "prefill", 100, 0),  # prompt of 100 tokens
        work("a", "decode", 1, 100),
        work("a", "decode", 1, 101),  # KV: 102, then preempted
        None,
        # resumed: positions 0-95 hit the prefix cache; 96-99 are prompt (prefill), 100-101 decode
        work("a", "prefill", 4, 96),
        work("a", "decode", 2, 100),
        work("a", "decode", 1, 102),
        work("a", "decode", 1, 103),
    ]
    t = 0.0
    for item in schedule:
        if item is None:
            att.on_preempted("a")
            continue
        step(att, clock, t, t + 0.02, [item])
        t += 0.02
    poll_at(att, clock, 0.3)  # the windows holding its steps close
    m = att.on_finished("a")
    assert m.n_preemptions == 1 and m.n_steps == 7 and m.final
    assert m.prefill_energy_j == pytest.approx(2 * 2.0)
    assert m.decode_energy_j == pytest.approx(5 * 2.0)

def test_aborted_and_never_scheduled_requests():
    clock, _, att = make(200.0)
    for i in range(5):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a"), work("b")])
    a = att.on_finished("a", aborted=True)
    assert a.aborted and a.final and a.energy_j == pytest.approx(10.0)
    ghost = att.on_finished("ghost", aborted=True)
    assert (ghost.energy_j, ghost.uncertainty_j, ghost.n_steps) == (0.0, 0.0, 0)
    assert ghost.aborted and ghost.final and ghost.source == "fake"
    assert [r.request_id for r in att.pop_finalized()] == ["a", "ghost"]


def test_interleaved_requests_join_and_leave_match_reference():
    power_w = 250.0
    clock, _, att = make(power_w)
    # (t0_ms, t1_ms, items) - requests joining and leaving, mixed phases, an idle gap
    schedule = [
        (0, 20, [("A", "prefill", 64, 64.0), ("B", "prefill", 32, 32.0)]),
        (20, 40, [("A", "decode", 1, 1.0), ("B", "decode", 1, 1.0), ("C", "prefill", 128, 128.0)]),
        (40, 60, [("A", "decode", 1, 1.0), ("B", "decode", 1, 1.0), ("C", "decode", 1, 1.0),
                  ("D", "prefill", 16, 16.0)]),
        ("finish", "A"),
        (60, 80, [("B", "decode", 1, 1.0), ("C", "decode", 1, 1.0), ("D", "decode", 1, 1.0)]),
        ("poll", 100),  # idle 80-100 ms
        (100, 140, [("C", "decode", 1, 2.0), ("D", "decode", 1, 1.0),
                    ("E", "prefill", 200, 200.0)]),
        ("finish", "D"),
        (140, 160, [("C", "decode", 1, 1.0), ("E", "prefill", 56, 56.0)]),
        ("abort", "B"),
        (160, 180, [("C", "decode", 1, 1.0), ("E", "decode", 1, 1.0)]),
        ("finish", "C"),
        (180, 200, [("E", "decode", 1, 1.0)]),
        ("finish", "E"),
        ("poll", 220), ("poll", 240), ("poll", 260), ("poll", 280), ("poll", 300),
    ]
    expected: dict[str, list[float]] = {}
    early: dict[str, MeasuredEnergy] = {}
    for entry in schedule:
        if entry[0] == "finish" or entry[0] == "abort":
            early[entry[1]] = att.on_finished(entry[1], aborted=entry[0] == "abort")
        elif entry[0] == "poll":
            poll_at(att, clock, entry[1] / 1000)
        else:
            t0, t1, items = entry
            step(att, clock, t0 / 1000, t1 / 1000,
                 [work(r, ph, n, 0, w) for r, ph, n, w in items])
            wsum = sum(w for *_, w in items)
            for r, ph, _, w in items:  # reference: constant power, each step gets P * dur
                e = expected.setdefault(r, [0.0, 0.0])
                e[ph == "decode"] += power_w * (t1 - t0) / 1000 * w / wsum
    finals = {m.request_id: m for m in att.pop_finalized()}
    assert sorted(finals) == ["A", "B", "C", "D", "E"]
    assert not early["A"].final and math.isnan(early["A"].energy_j)  # no window closed yet
    assert not early["D"].final and not math.isnan(early["D"].energy_j)
    assert early["E"].final  # its last step ended at the tick at 0.2 s
    assert finals["B"].aborted and not finals["A"].aborted
    for rid, (pre, dec) in expected.items():
        assert finals[rid].prefill_energy_j == pytest.approx(pre, abs=1e-9), rid
        assert finals[rid].decode_energy_j == pytest.approx(dec, abs=1e-9), rid
        assert finals[rid].final
    assert sum(m.energy_j for m in finals.values()) == pytest.approx(att.attributed_energy_j)
    assert att.total_energy_j == pytest.approx(power_w * 0.3)
    assert att.idle_energy_j == pytest.approx(power_w * (0.02 + 0.1))  # 80-100 and 200-300 ms
    assert_conserved(att)


def test_counter_that_does_not_advance_for_several_steps():
    clock, _, att = make(300.0)
    for i in range(9):  # 10 ms steps; the counter stays at 0 until the tick at 0.1
        step(att, clock, 0.01 * i, 0.01 * (i + 1), [work("x" if i < 5 else "y")])
        assert att.total_energy_j == 0.0 and att.attributed_energy_j == 0.0
    x_early = att.on_finished("x")
    assert not x_early.final and math.isnan(x_early.energy_j)  # nothing closed yet
    step(att, clock, 0.09, 0.1, [work("y")])
    assert att.total_energy_j == pytest.approx(30.0)
    (x,) = att.pop_finalized()
    assert x.final and x.energy_j == pytest.approx(15.0)
    assert att.on_finished("y").energy_j == pytest.approx(15.0)


def test_overlapping_steps_are_clipped_not_double_counted():
    clock, _, att = make(300.0)
    step(att, clock, 0.0, 0.06, [work("a")])
    step(att, clock, 0.04, 0.1, [work("b")])  # began before the last read: counts from 0.06
    a, b = att.on_finished("a"), att.on_finished("b")
    assert (a.energy_j, b.energy_j) == pytest.approx((18.0, 12.0))


def test_tensor_parallel_devices_with_their_own_windows():
    # device 0: 300 W ticking at 0.1, 0.2, ...; device 1: 100 W ticking at 0.05, 0.15, ...
    clock, _, att = make([300.0, 100.0], phase_s=[0.0, 0.05])
    assert att.n_devices == 2
    for i in range(6):
        step(att, clock, 0.05 * i, 0.05 * (i + 1), [work("a")])
    early = att.on_finished("a")
    # device 0 closed 90 J; device 1 closed 5 + 10 + 10 J, its open (0.25, 0.3] step ~ 100 W
    assert not early.final
    assert early.energy_j == pytest.approx(90.0 + 25.0 + 5.0)
    assert early.estimated_energy_j == pytest.approx(5.0)
    poll_at(att, clock, 0.35)
    (m,) = att.pop_finalized()
    assert m.final and m.energy_j == pytest.approx(120.0)
    # device 0: baseline 0.1 s x 300 W, last boundary 0.05 s x 300 W
    u0 = math.hypot(30.0, 15.0)
    assert early.uncertainty_j == pytest.approx(u0 + math.hypot(10.0, 5.0) + 5.0)
    # device 1: baseline 0.1 s x 100 W; boundary 0.25: 5 J x (1 - 0.5); boundary 0.35:
    # 5 J x 0.5; last window half idle, idle power only bounded: 5 J x 5/5, and its step
    # covers half the update period: 5 J x 0.5
    u1 = math.sqrt(10.0**2 + 2.5**2 + 2.5**2 + (5.0 + 2.5) ** 2)
    assert m.uncertainty_j == pytest.approx(u0 + u1)  # devices add linearly
    assert_conserved(att)


def test_short_request_uncertainty_is_of_the_order_of_its_estimate():
    clock, _, att = make(300.0)
    for i in range(100):  # a long request over 2 s; a short one for 2 steps (40 ms)
        items = [work("long")] + ([work("short")] if 26 <= i < 28 else [])
        step(att, clock, 0.02 * i, 0.02 * (i + 1), items)
        if i == 27:
            short_early = att.on_finished("short")
    long_ = att.on_finished("long")
    (short,) = [m for m in att.pop_finalized() if m.request_id == "short"]
    assert short_early.uncertainty_j == pytest.approx(short_early.energy_j)  # all open: 100%
    assert short.energy_j == pytest.approx(6.0)  # 2 steps x 20 ms x 300 W / 2
    # window (0.5, 0.6], q = 6/30: boundaries 6 J x q each; step term 0.5 x 300 W x
    # sqrt(5 steps x (2 x (0.01 - 0.2 x 0.02)^2 + 3 x (0.2 x 0.02)^2)) s = 3.674 J, larger
    # than the resolution term 6 J x (1 - 0.04 s / 0.1 s) = 3.6 J
    x_step = 0.5 * 300 * math.sqrt(5 * (2 * 0.006**2 + 3 * 0.004**2))
    # row split: in its 2 steps it shares 0.01 s of mass with "long" each: 0.3 x 300 W x 0.01 s
    x_rows = 0.3 * 300 * 2 * (0.01 - 0.01**2 / 0.02)
    assert short.uncertainty_j == pytest.approx(math.sqrt(1.2**2 + 1.2**2 + x_step**2 + x_rows**2))
    assert short.uncertainty_j / short.energy_j > 0.5
    # long: baseline 30 J, last boundary 6 J; the short one's window: 2 x 6 J x 0.2 and the
    # same step term (its share deviates from 0.8 by the same amounts)
    assert long_.uncertainty_j == pytest.approx(math.sqrt(30**2 + 6**2 + 2 * 1.2**2 + x_step**2 + x_rows**2))
    assert long_.uncertainty_j / long_.energy_j < 0.06


# ------------------------------------------------------------------ failures
def test_transient_read_error_skips_one_read_and_loses_nothing():
    clock, reader, att = make(300.0)
    reader.fail_on_read(5)  # the read at 0.1, when the counter ticks
    for i in range(10):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a")])
    m = att.on_finished("a")
    assert att.read_errors == 1 and att.source == "fake"
    assert m.final and m.source == "fake" and m.energy_j == pytest.approx(60.0)
    # window 1 closes at 0.12 instead (30 J over 0.12 s = 250 W): baseline 0.1 s x 250 W;
    # the last window (0.12, 0.2] is 30 J / 0.08 s = 375 W, last read gap 0.02 s
    assert m.uncertainty_j == pytest.approx(math.hypot(25.0, 7.5))


def test_gpu_lost_mid_run_marks_partial_and_unavailable_and_never_raises():
    clock, reader, att = make(300.0)
    for i in range(7):  # a and c share steps until 0.14
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a"), work("c")])
    c_early = att.on_finished("c")
    reader.nvml.lose_device(0)
    for i in range(7, 10):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a")])  # read at 0.16 raises GpuLost
    assert att.source == "unavailable" and "GpuLost" in att.failure_reason
    a = att.on_finished("a")
    # measured: window (0, 0.1] 15 J each; lost at 300 W: a 0.04 s (0.1-0.16) + 0.04 s after
    assert a.final and a.source == "fake-partial"
    assert a.energy_j == pytest.approx(15.0 + 24.0) and a.estimated_energy_j == pytest.approx(24.0)
    # window 1 boundaries (a's share 0.5) and the row split of 5 shared steps (0.3 x 300 W x 5 x 0.005 s)
    closed_u = math.sqrt((30.0 * 0.5) ** 2 + (6.0 * 0.5) ** 2 + (0.3 * 300 * 5 * 0.005) ** 2)
    assert a.uncertainty_j == pytest.approx(closed_u + 24.0)
    finals = {m.request_id: m for m in att.pop_finalized()}
    c = finals["c"]  # pending when the GPU was lost: delivered final then
    assert c.final and c.source == "fake-partial" and c.energy_j == pytest.approx(21.0)
    assert c.uncertainty_j == pytest.approx(closed_u + 6.0)
    assert c_early.energy_j == pytest.approx(21.0) and not c_early.final
    step(att, clock, 0.2, 0.22, [work("new")])
    new = att.on_finished("new")
    assert new.source == "unavailable" and math.isnan(new.energy_j) and new.n_steps == 1
    assert_conserved(att)


def test_stalled_counter_fails_the_reader():
    clock, _, att = make(lambda t: 300.0 if t < 0.1 else 0.0, max_open_window_s=0.5)
    for i in range(35):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a")])
    assert "did not change" in att.failure_reason
    m = att.on_finished("a")
    assert m.source == "fake-partial"
    assert m.energy_j == pytest.approx(30.0 + 300.0 * 0.6)  # 30 J measured + 0.6 s estimated


def test_counter_going_backwards_fails_the_reader():
    clock, _, att = make(lambda t: 300.0 if t < 0.1 else -300.0)
    for i in range(10):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a")])
    assert "CounterWentBackwards" in att.failure_reason
    assert att.total_energy_j == pytest.approx(30.0)


def test_reader_dead_at_start():
    clock = ManualClock()
    reader = FakeEnergyReader(100.0, clock=clock)
    reader.nvml.lose_device(0)
    att = EnergyAttributor(reader, clock=clock)
    assert "baseline read failed" in att.failure_reason
    step(att, clock, 0.0, 0.02, [work("a")])
    assert att.on_finished("a").source == "unavailable"


def test_null_reader_gives_nan_unavailable_for_every_request():
    clock = ManualClock()
    att = EnergyAttributor(NullEnergyReader("no gpu"), clock=clock)
    step(att, clock, 0.0, 0.02, [work("a"), work("b", "prefill", 10)])
    step(att, clock, 0.02, 0.04, [work("a")])
    a = att.on_finished("a")
    assert a.source == "unavailable" and a.final and a.n_steps == 2
    for v in (a.energy_j, a.prefill_energy_j, a.decode_energy_j, a.uncertainty_j):
        assert math.isnan(v)
    assert math.isnan(att.on_finished("never").energy_j)
    assert [m.request_id for m in att.pop_finalized()] == ["a", "never"]
    assert att.total_energy_j == 0.0 and att.source == "unavailable"


def test_on_final_callback_sees_each_final_once():
    seen: list[MeasuredEnergy] = []
    clock, _, att = make(300.0, on_final=seen.append)
    for i in range(4):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("a"), work("b")])
    att.on_finished("a")
    for i in range(4, 10):
        step(att, clock, 0.02 * i, 0.02 * (i + 1), [work("b")])
    att.on_finished("b")
    assert [m.request_id for m in seen] == ["a", "b"]
    assert seen == att.pop_finalized() and att.pop_finalized() == []


# ------------------------------------------------------------------ statistical check
def _simulate_random_schedule(seed: int, sampled_fraction: float):
    """Step power depends on the batch (prefill-heavy draws up to ~3x more), 110 W idle, idle
    gaps polled every 20 ms; truth = each step's energy split by weight."""
    rng = random.Random(seed)
    starts: list[float] = []
    spans: list[tuple[float, float, float]] = []

    def power_w(t: float) -> float:
        i = bisect.bisect_right(starts, t) - 1
        return spans[i][2] if i >= 0 and t < spans[i][1] else 110.0

    clock, _, att = make(power_w, sampled_fraction=sampled_fraction)
    truth: dict[str, float] = {}
    active: dict[str, list[int]] = {}
    t, next_id = 0.0, 0
    for _ in range(300):
        if rng.random() < 0.08:  # idle spell, polled every 20 ms
            gap_end = t + rng.choice([0.03, 0.15, 0.4])
            while t + 0.02 < gap_end:
                t = round(t + 0.02, 6)
                poll_at(att, clock, t)
            t = round(gap_end, 6)
        while len(active) < rng.randint(1, 8):
            active[f"r{next_id}"] = [rng.randint(20, 600), 0, rng.randint(1, 80)]
            next_id += 1
        items, p_tok, d_tok = [], 0, 0
        for rid, state in active.items():
            if state[0] > 0:
                n = min(state[0], 256)
                items.append(work(rid, "prefill", n, state[1], 0.5 * n))
                state[0] -= n
                state[1] += n
                p_tok += n
            else:
                items.append(work(rid, "decode", 1, state[1], 3.0))
                state[1] += 1
                state[2] -= 1
                d_tok += 1
        dur = round(0.008 + 8e-5 * p_tok + 4e-4 * d_tok, 3)
        p = (180 + 420 * p_tok / (p_tok + 20 * d_tok)) * rng.uniform(0.9, 1.1)
        starts.append(t)
        spans.append((t, t + dur, p))
        wsum = sum(i.weight for i in items)
        for i in items:
            truth[i.request_id] = truth.get(i.request_id, 0.0) + p * dur * i.weight / wsum
        step(att, clock, t, t + dur, items)
        t = round(t + dur + 0.001, 6)
        for rid in [r for r, s in active.items() if s[0] <= 0 and s[2] <= 0]:
            del active[rid]
            att.on_finished(rid)
    for rid in list(active):
        att.on_finished(rid)
    for _ in range(10):
        t = round(t + 0.02, 6)
        poll_at(att, clock, t)
    return att, att.pop_finalized(), truth, next_id


@pytest.mark.parametrize(
    ("sampled_fraction", "min_coverage", "max_median_error"),
    [(1.0, 0.85, 0.15), (0.25, 0.8, 0.2)],  # 0.25: A100/H100 part-time power sampling
)
def test_uncertainty_covers_error_on_random_schedules_with_known_power(
    sampled_fraction, min_coverage, max_median_error
):
    covered, rel_errors = [], []
    for seed in (7, 8, 9):
        att, finals, truth, n_requests = _simulate_random_schedule(seed, sampled_fraction)
        assert len(finals) == n_requests and all(m.final for m in finals)
        for m in finals:
            error = abs(m.energy_j - truth[m.request_id])
            covered.append(error <= m.uncertainty_j)
            rel_errors.append(error / truth[m.request_id])
        assert sum(m.energy_j for m in finals) == pytest.approx(att.attributed_energy_j)
        assert_conserved(att)
    rel_errors.sort()
    assert sum(covered) / len(covered) >= min_coverage  # an error scale, not a strict bound
    assert rel_errors[len(rel_errors) // 2] < max_median_error
