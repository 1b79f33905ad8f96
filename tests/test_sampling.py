"""Focused energy data sampling (Algorithm 1) with the analytic SIMULATOR oracle and stub predictors."""

import csv
import json
import os

import numpy as np
import pytest

from llmco2_serve.workload.arch import ModelArch
from llmco2_serve.predictors.sampling import (
    DEFAULT_RANGES,
    AnalyticSimulatorOracle,
    SamplePoint,
    fine_grained_sample,
    focused_sampling,
    inference_prior,
    prior_architectures,
    relative_errors,
    sample_from_priors,
    select_focus,
    simulated_phase_energy_j,
    split_train_test,
)
from llmco2_serve.prediction.records import RecordError, parse_record

DATA = os.path.join(os.path.dirname(__file__), "..", "llmco2_serve", "data")
LLAMA_1B = prior_architectures()["llama3.2-1b"]


def point(**kw):
    base = dict(model="llama3.2-1b", arch=LLAMA_1B, gpu="H100", n_gpu=1, dtype="bfloat16", batch=1,
                prompt_len=100, gen_tokens=5)
    base.update(kw)
    return SamplePoint(**base)


class CountingOracle:
    def __init__(self, inner):
        self.inner, self.calls, self.points = inner, 0, []

    def measure(self, points):
        self.calls += 1
        self.points.append(list(points))
        return self.inner.measure(points)


# --- power model and simulator --------------------------------------------------------------------

def test_phase_energy_hand_computed():
    # t = 1.0 + 1000 * 1e-4 = 1.1 s; per GPU: 140 W idle x 1.1 s + (700 - 140) W x 1.0 s busy = 714 J
    e, t = simulated_phase_energy_j(1.0, 1000, 1e-4, 140.0, 700.0, 2)
    assert t == pytest.approx(1.1)
    assert e == pytest.approx(2 * 714.0)
    assert simulated_phase_energy_j(0.0, 0, 1e-4, 140.0, 700.0, 1) == (0.0, 0.0)


def test_simulator_launch_count_and_labels():
    p = point(prompt_len=100, gen_tokens=5)
    no_overhead = AnalyticSimulatorOracle(launch_overhead_s=0.0, noise_sigma=0.0).measure([p])[0]
    overhead = AnalyticSimulatorOracle(launch_overhead_s=1e-3, noise_sigma=0.0).measure([p])[0]
    # llama layer: 13 kernels (norm, q, k, v, attention, o, add, norm, gate, up, act, down, add) x 16 layers
    # + 3 head kernels = 211 launches per pass; 1 prefill pass + 4 decode passes.
    assert overhead["request_time_s"] - no_overhead["request_time_s"] == pytest.approx(5 * 211 * 1e-3)
    # Without launch gaps the GPU is fully busy: energy = TDP (H100 SXM: 700 W) x time.
    assert no_overhead["request_energy_j"] == pytest.approx(700.0 * no_overhead["request_time_s"])
    assert overhead["engine"] == "analytic-simulator"
    assert overhead["source"] == "simulated, not measured"
    rec = parse_record(json.loads(json.dumps(overhead)), "sim")
    assert rec.gpu == "H100-SXM-80GB" and rec.prompt_len == 100 and rec.gen_tokens == 5
    assert rec.request_energy_j == pytest.approx(rec.prefill_energy_j + rec.decode_energy_j)
    one_token = AnalyticSimulatorOracle(noise_sigma=0.0).measure([point(gen_tokens=1)])[0]
    assert one_token["decode_energy_j"] == 0.0


def test_simulator_noise_is_seeded():
    pts = [point(prompt_len=n) for n in (10, 200, 3000)]
    a = AnalyticSimulatorOracle(noise_sigma=0.1, seed=7).measure(pts)
    b = AnalyticSimulatorOracle(noise_sigma=0.1, seed=7).measure(pts)
    c = AnalyticSimulatorOracle(noise_sigma=0.1, seed=8).measure(pts)
    clean = AnalyticSimulatorOracle(noise_sigma=0.0).measure(pts)
    assert a == b
    assert [r["prefill_energy_j"] for r in a] != [r["prefill_energy_j"] for r in c]
    ratios = np.array([r["prefill_energy_j"] / q["prefill_energy_j"] for r, q in zip(a, clean)])
    assert np.all(ratios != 1.0) and np.all(np.abs(np.log(ratios)) < 0.5)  # 5 sigma


# --- priors -----------------------------------------------------------------------------------------

def test_prior_architectures_match_measured_configs():
    measured = {}
    with open(os.path.join(DATA, "h200-hf-eager.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            measured[r["model"]] = {k: v for k, v in r["arch"].items() if k != "n_params"}
    priors = prior_architectures()
    assert set(priors) == set(measured)
    for name, arch in priors.items():
        assert arch == measured[name], name
        ModelArch.from_hf_config(arch)


def test_inference_prior_is_the_trace():
    with open(os.path.join(DATA, "azure_trace_slice.csv"), encoding="utf-8") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    prior = inference_prior()
    assert prior.shape == (len(rows), 2)
    assert tuple(prior[0]) == rows[0]
    assert prior.min() >= 1


def test_sample_from_priors_ranges_and_memory_filter():
    rng = np.random.default_rng(0)
    pts = sample_from_priors(40, rng)
    trace = {tuple(r) for r in inference_prior()}
    assert {p.batch for p in pts} <= {1, 2} and len({p.batch for p in pts}) == 2
    assert all((p.prompt_len, p.gen_tokens) in trace for p in pts)
    # Mixtral-8layer (11.9B params, 23.7 GB of bf16 weights) does not fit 90% of an L4's 24 GB.
    mix = {k: v for k, v in prior_architectures().items() if k in ("mixtral-8x7b-8layer", "llama3.2-1b")}
    on_l4 = sample_from_priors(20, np.random.default_rng(1), archs=mix, gpus=("L4",))
    assert {p.model for p in on_l4} == {"llama3.2-1b"}
    with pytest.raises(ValueError, match="fits GPU memory"):
        sample_from_priors(1, rng, archs={"m": mix["mixtral-8x7b-8layer"]}, gpus=("L4",), max_tries=5)


# --- pieces of Algorithm 1 ------------------------------------------------------------------------

def test_fine_grained_within_range_and_valid():
    parent = point(prompt_len=4, gen_tokens=1, batch=2)
    kids = fine_grained_sample(parent, 300, DEFAULT_RANGES, np.random.default_rng(0))
    prompt = np.array([k.prompt_len for k in kids])
    gen = np.array([k.gen_tokens for k in kids])
    layers = np.array([k.layers for k in kids])
    assert prompt.min() == 1 and prompt.max() == 14  # 4 - 10 clipped to 1; 4 + 10
    assert set(gen) == {1, 2}  # 1 - 1 clipped to 1
    assert set(layers) == {15, 16, 17}
    assert all(k.batch == 2 and k.gpu == "H100" and k.model == "llama3.2-1b" for k in kids)
    assert all(k.arch["hidden_size"] == 2048 for k in kids)
    bloom = point(model="bloom-1b7", arch=prior_architectures()["bloom-1b7"], prompt_len=50)
    bl = fine_grained_sample(bloom, 50, {"layers": 1}, np.random.default_rng(1))
    assert {k.arch["n_layer"] for k in bl} == {23, 24, 25}
    assert all("num_hidden_layers" not in k.arch and k.prompt_len == 50 for k in bl)
    with pytest.raises(ValueError, match="'hidden'"):
        fine_grained_sample(parent, 1, {"hidden": 8}, np.random.default_rng(0))


def test_split_select_and_errors():
    train, test = split_train_test(list(range(24)), np.random.default_rng(0))
    assert len(train) == 19 and len(test) == 5  # round(0.2 x 24) = 5
    assert sorted(train + test) == list(range(24))
    errs = relative_errors([110.0, 50.0, 100.0, 130.0], [100.0, 100.0, 100.0, 100.0])
    np.testing.assert_allclose(errs, [0.1, 0.5, 0.0, 0.3])
    assert select_focus(errs, 2, 0.05) == [1, 3]
    assert select_focus(errs, 10, 0.2) == [1, 3]
    with pytest.raises(ValueError, match="request_energy_j"):
        relative_errors([1.0], [0.0])


def test_sample_point_validation():
    with pytest.raises(ValueError, match="'prompt_len'"):
        point(prompt_len=0)
    with pytest.raises(ValueError, match="'arch'"):
        point(arch={"hidden_size": 8})


# --- the loop -----------------------------------------------------------------------------------

def _run_gnn(seed):
    oracle = CountingOracle(AnalyticSimulatorOracle(seed=seed))
    out = focused_sampling(oracle, initial=24, per_point=4, focus=3, error_threshold=0.0, max_rounds=2,
                           epochs=40, seed=seed)
    return oracle, out


def test_loop_with_gnn_grows_sets_and_is_reproducible():
    oracle, (train, test, history) = _run_gnn(seed=3)
    # Round 0: 24 points -> 19/5. Each round: 3 parents x 4 = 12 new -> 10 train, round(2.4) = 2 test.
    assert [(h.round, h.n_train, h.n_test) for h in history] == [(0, 19, 5), (1, 29, 7), (2, 39, 9)]
    assert len(train) == 39 and len(test) == 9
    assert all(np.isfinite(h.mape) and h.mape > 0 for h in history)
    assert oracle.calls == 3 and [len(p) for p in oracle.points] == [24, 12, 12]
    for r in train + test:
        assert r["source"] == "simulated, not measured"
        parse_record(r, "loop")
    # Every fine-grained point lies within +-C of a test point of TD at the time, same GPU/dtype/batch.
    td = [q for q in oracle.points[0] if any(_same(q, r) for r in test)]
    for new in oracle.points[1]:
        assert any(_near(new, par) for par in td), new
    _, (train2, test2, history2) = _run_gnn(seed=3)
    assert train2 == train and test2 == test and history2 == history


def _same(p, rec):
    return (p.arch_dict() == rec["arch"] and p.prompt_len == rec["prompt_len"] and p.gen_tokens == rec["gen_tokens"]
            and p.batch == rec["batch"] and p.model == rec["model"])


def _near(child, parent):
    return (child.gpu == parent.gpu and child.dtype == parent.dtype and child.batch == parent.batch
            and child.model == parent.model and abs(child.prompt_len - parent.prompt_len) <= 10
            and abs(child.gen_tokens - parent.gen_tokens) <= 1 and abs(child.layers - parent.layers) <= 1
            and child.prompt_len >= 1 and child.gen_tokens >= 1 and child.layers >= 1)


def _stub_with_errors(schedule):
    """train_fn counts trainings; predict_fn is off by schedule[k] after the k-th training."""
    def train_fn(records):
        train_fn.count += 1
        return train_fn.count - 1
    train_fn.count = 0

    def predict_fn(model, records):
        return np.array([r["request_energy_j"] * (1 + schedule[model]) for r in records])
    return train_fn, predict_fn


@pytest.mark.parametrize("schedule,expected_rounds", [
    ([0.5, 0.2, 0.05, 0.01], 3),  # stops right after the error falls to 0.05 < 0.1
    ([0.08], 1),  # already below the threshold: no refinement round
    ([0.5] * 10, 4),  # never below: 1 + max_rounds
])
def test_loop_stops_when_error_below_threshold(schedule, expected_rounds):
    oracle = CountingOracle(AnalyticSimulatorOracle(seed=0))
    tf, pf = _stub_with_errors(schedule)
    _, _, history = focused_sampling(oracle, initial=10, per_point=2, focus=2, error_threshold=0.1, max_rounds=3,
                                     train_fn=tf, predict_fn=pf, seed=0)
    assert len(history) == expected_rounds and oracle.calls == expected_rounds
    np.testing.assert_allclose([h.mape for h in history], schedule[:expected_rounds])


def test_loop_refines_around_largest_errors():
    # Error grows with prompt length, so the focus point is the longest prompt in TD.
    def train_fn(records):
        return None

    def predict_fn(model, records):
        return np.array([r["request_energy_j"] * (1 + r["prompt_len"] / 1e4) for r in records])

    oracle = CountingOracle(AnalyticSimulatorOracle(seed=0))
    _, test, history = focused_sampling(oracle, initial=20, per_point=5, focus=1, error_threshold=0.0,
                                        max_rounds=1, train_fn=train_fn, predict_fn=predict_fn, seed=2)
    initial_test = test[:4]
    longest = max(initial_test, key=lambda r: r["prompt_len"])
    parent = next(p for p in oracle.points[0] if _same(p, longest))
    assert len(oracle.points[1]) == 5
    assert all(_near(c, parent) for c in oracle.points[1])


def test_bad_oracle_record_is_reported():
    class Broken:
        def measure(self, points):
            recs = AnalyticSimulatorOracle().measure(points)
            for r in recs:
                del r["request_energy_j"]
            return recs

    with pytest.raises(RecordError, match="request_energy_j"):
        focused_sampling(Broken(), initial=5, per_point=1, train_fn=lambda r: None,
                         predict_fn=lambda m, r: np.ones(len(r)))
