"""The engine meter's background mode (the poller records steps) against its inline mode.

With ``background_reads`` the step thread only queues finished steps; the poller records them.
A request that finishes while its steps are still queued gets its value so far from
``EnergyAttributor.lookahead`` (what recording them would add) instead of recording them on the
step thread. The truth here is the recording path itself, which the simulation tests validate:
a meter that records the queued steps before answering (lookahead switched off) must give the
same first answers and the same final values, request by request, under vLLM's async step
pattern with chunked prefill and churn. The counters' books close the loop from outside: final
values + idle + unreported energy = what the fake counters (constant power) moved.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock
from llmco2_serve.hooks.engine_core import step_rows
from llmco2_serve.prediction.predictor import Predictor
from llmco2_serve.runtime.engine_meter import EngineMeter

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "architectures": ["LlamaForCausalLM"]}


class _Req:
    def __init__(self, rid: str, prompt: int, target: int) -> None:
        self.request_id, self.num_prompt_tokens, self.num_computed_tokens = rid, prompt, 0
        self.num_output_tokens, self.target = 0, target
        self.recompute_to = 0  # after a preemption: tokens to compute again (prompt + outputs - 1)


class _Sched:
    def __init__(self) -> None:
        self.requests: dict[str, _Req] = {}


class _Out:
    def __init__(self, scheduled: dict[str, int]) -> None:
        self.num_scheduled_tokens = scheduled
        self.scheduled_spec_decode_tokens: dict = {}


def _run(predictor, lookahead: bool, seed: int, n_requests: int = 300, batch: int = 12):
    """Drive one background-mode meter; returns ({rid: first answer}, {rid: final}, meter, number of
    steps in which a request had two rows: a recompute after preemption crossing its prompt's end,
    {rid: preemptions})."""
    clock = ManualClock()
    reader = FakeEnergyReader([300.0, 310.0], clock=clock, update_period_s=0.05, phase_s=[0.0, 0.021])
    meter = EngineMeter(reader, predictor, clock=clock, background_reads=True)
    if not lookahead:
        meter.attributor.lookahead = lambda *a, **k: None  # record the queued steps, then answer
    rng = np.random.default_rng(seed)
    poll = np.random.default_rng(seed + 1)  # the poller's timing: 0-3 steps queued at a finish
    preempt = np.random.default_rng(seed + 2)  # preemptions: the request recomputes from token 0
    two_rows = 0
    preemptions: dict[str, int] = {}
    sched, firsts, finals = _Sched(), {}, {}
    started = done_n = step = 0
    prev = None
    while done_n < n_requests:
        while len(sched.requests) < batch and started < n_requests:
            rid = f"r{started}"
            prompt = int(rng.integers(1, 900))
            target = 1 if rng.random() < 0.2 else int(rng.integers(2, 40))  # one-token requests too
            sched.requests[rid] = _Req(rid, prompt, target)
            started += 1
        scheduled = {}
        for r in sched.requests.values():
            if r.num_output_tokens >= 2 and preempt.random() < 0.02:  # preempted, resumed at once
                meter.preempted(r.request_id)
                preemptions[r.request_id] = preemptions.get(r.request_id, 0) + 1
                r.num_computed_tokens, r.recompute_to = 0, r.num_prompt_tokens + r.num_output_tokens - 1
            upto = max(r.num_prompt_tokens, r.recompute_to)
            n = min(256, upto - r.num_computed_tokens) if r.num_computed_tokens < upto else 1
            r.num_computed_tokens += n
            scheduled[r.request_id] = n
        rows = step_rows(sched, _Out(scheduled))
        two_rows += len(rows) - len({row[0] for row in rows})
        meter.step_started(step, rows)
        clock.advance(float(rng.uniform(0.004, 0.03)))
        if prev is not None:  # async: step N finishes after N+1 was scheduled
            meter.step_finished(prev)
        finished = []
        for r in sched.requests.values():
            if r.num_computed_tokens >= max(r.num_prompt_tokens, r.recompute_to):
                r.num_output_tokens += 1
                if r.num_output_tokens >= r.target:
                    finished.append(r.request_id)
        for rid in finished:
            firsts[rid] = meter.finished(rid, aborted=bool(rng.random() < 0.05))
            del sched.requests[rid]
        if poll.random() < 0.4:
            meter.service_reads(0.0)
        for m in meter.pop_final():
            finals[m.request_id] = m
        done_n += len(finished)
        prev = step
        step += 1
    if prev is not None:
        meter.step_finished(prev)
    for _ in range(200):  # drain: the poller catches up, idle reads close every window
        meter.service_reads(0.0)
        clock.advance(0.05)
        meter.idle_tick()
        for m in meter.pop_final():
            finals[m.request_id] = m
    return firsts, finals, meter, two_rows, preemptions


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_config(LLAMA_8B, gpu="h100")


@pytest.mark.parametrize("seed", [0, 1])
def test_lookahead_answers_equal_recording_first(predictor, seed):
    firsts, finals, meter, two_rows, preemptions = _run(predictor, lookahead=True, seed=seed)
    ref_firsts, ref_finals, ref_meter, _, _ = _run(predictor, lookahead=False, seed=seed)
    assert set(firsts) == set(ref_firsts) and len(firsts) == 300
    assert two_rows > 0  # recomputes crossing the prompt's end (a request with two rows in a step)
    for rid, ref in ref_firsts.items():
        got = firsts[rid]
        for field in ("prefill_energy_j", "decode_energy_j", "estimated_energy_j", "uncertainty_j", "mean_batch"):
            assert getattr(got, field) == pytest.approx(getattr(ref, field), rel=1e-9, abs=1e-12, nan_ok=True), (rid, field)
        assert (got.n_steps, got.n_preemptions, got.aborted, got.source) == (
            ref.n_steps, ref.n_preemptions, ref.aborted, ref.source), rid
    # every request got exactly one final value, and the same one
    assert set(finals) == set(ref_finals) == set(firsts)
    for rid, ref in ref_finals.items():
        assert finals[rid].energy_j == pytest.approx(ref.energy_j, rel=1e-9, abs=1e-12, nan_ok=True), rid
        assert finals[rid].final
        # preemptions: what the driver did, also to requests whose steps were all still queued
        assert finals[rid].n_preemptions == ref.n_preemptions == preemptions.get(rid, 0), rid
    # the lookahead path was taken (requests finished with steps queued), and nothing is left behind
    assert meter.attributor.live_requests == 0 == ref_meter.attributor.live_requests
    assert meter.totals()["total_j"] == pytest.approx(ref_meter.totals()["total_j"], rel=1e-12)
    # and against the counters, not the recording path: every joule the fake counters moved (their
    # own constant 300 + 310 W) is in a final value, the idle books or the unreported entry
    books = meter.totals()
    measured = sum(m.energy_j for m in finals.values() if m.energy_j == m.energy_j)
    assert measured + books["idle_j"] + books["unreported_j"] == pytest.approx(books["total_j"], rel=1e-9)
    assert books["total_j"] > 0 and measured > 0 and books["idle_j"] > 0


def test_lookahead_is_used_when_steps_are_queued(predictor, monkeypatch):
    calls = {"n": 0}
    real = EngineMeter._record_queued

    def counting(self, upto=None):
        if upto is not None:  # an inline drain for a finishing request
            calls["n"] += 1
        return real(self, upto)

    monkeypatch.setattr(EngineMeter, "_record_queued", counting)
    _run(predictor, lookahead=True, seed=3, n_requests=100)
    assert calls["n"] == 0
    _run(predictor, lookahead=False, seed=3, n_requests=100)
    assert calls["n"] > 10
