"""Baselines (LLMCarbon, DeepEn-style random forest, NNLQP-style GNN) on synthetic energy data."""

import dataclasses
import math

import numpy as np
import pytest

from llmco2_serve.workload.graph import Segment
from llmco2_serve.hardware.gpus import gpu_spec
from llmco2_serve.predictors.baselines import (
    FLAT_FEATURE_NAMES,
    NNLQP_NODE_FEATURE_NAMES,
    PREDICTOR_NAMES,
    EnergyPredictor,
    GNNPredictor,
    LLMCarbonBaseline,
    NNLQPBaseline,
    RandomForestBaseline,
    fit_llmcarbon_efficiency,
    flat_features,
    llmcarbon_energy_j,
    make_predictor,
    nnlqp_node_features,
)
from llmco2_serve.predictors.dataset import sample_from_record, template_for_record
from llmco2_serve.predictors.train import TrainConfig
from llmco2_serve.prediction.records import parse_record

ARCHS = {
    "tiny-llama": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000, attn_impl="sdpa"),
    "small-llama": dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=2000, attn_impl="sdpa"),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=384, intermediate_size=1024, num_hidden_layers=3,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=64, vocab_size=1500, attn_impl="sdpa"),
}
H200_PEAK_BF16 = 989.4e12  # data/gpus.csv, H200-SXM-141GB dense bf16
H200_TDP_W = 700.0


def make_sample(model, batch, prompt_len, gen_tokens, gpu="NVIDIA H200", energies=(1.0, 1.0)):
    pre, dec = energies
    row = dict(model=model, arch=ARCHS[model], dtype="bfloat16", gpu=gpu, n_gpu=1, batch=batch,
               prompt_len=prompt_len, gen_tokens=gen_tokens, prefill_energy_j=pre, decode_energy_j=dec,
               request_energy_j=pre + dec)
    return sample_from_record(parse_record(row, "synthetic"))


def relabel(sample, prefill_j, decode_j):
    return dataclasses.replace(sample, prefill_energy_j=float(prefill_j), decode_energy_j=float(decode_j),
                               request_energy_j=float(prefill_j + decode_j))


def grid(models=tuple(ARCHS), seed=0, n_per_model=12):
    rng = np.random.default_rng(seed)
    out = []
    for m in models:
        for _ in range(n_per_model):
            out.append(make_sample(m, int(rng.integers(1, 9)), int(rng.integers(16, 2048)), int(rng.integers(2, 200))))
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny graphs train several times faster on one thread than on two oversubscribed cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mape(pred, meas):
    pred, meas = np.asarray(pred), np.asarray(meas)
    return float(np.mean(np.abs(pred - meas) / meas))


# ---------------------------------------------------------------------------------------------- LLMCarbon

def test_llmcarbon_equation_hand_computed():
    # t = 1e12 / (2 * 1e15 * 0.5) = 1e-3 s; E = 2 GPUs * 700 W * 1e-3 s = 1.4 J
    assert llmcarbon_energy_j(1e12, 1e15, 700.0, 2, 0.5) == pytest.approx(1.4)
    # n_gpu cancels: the same FLOPs on 1 or 4 GPUs cost the same energy
    assert llmcarbon_energy_j(1e12, 1e15, 700.0, 4, 0.5) == pytest.approx(1.4)


def test_efficiency_fit_is_geometric_mean_in_log_space():
    # each row's own efficiency: 0.5 J / E; rows at u = 0.2 and u = 0.8 -> sqrt(0.16) = 0.4
    u = fit_llmcarbon_efficiency([1e12, 1e12], [1e15, 1e15], [500.0, 500.0], [2.5, 0.625])
    assert u == pytest.approx(0.4)
    with pytest.raises(ValueError, match="positive"):
        fit_llmcarbon_efficiency([1e12], [1e15], [500.0], [0.0])


def test_llmcarbon_recovers_known_efficiency_and_phases():
    u_true = 0.3
    spec = gpu_spec("NVIDIA H200")  # the constants below are this table row's
    assert (spec.peak_flops_per_s("bfloat16"), spec.tdp_w) == pytest.approx((H200_PEAK_BF16, H200_TDP_W))
    samples = []
    for s in grid(seed=1):
        e_pre = s.totals["prefill_flops"] * H200_TDP_W / (H200_PEAK_BF16 * u_true)
        e_dec = s.totals["decode_flops"] * H200_TDP_W / (H200_PEAK_BF16 * u_true)
        samples.append(relabel(s, e_pre, e_dec))
    zero = relabel(samples[0], 0.0, 0.0)  # a counter-noise row: cannot enter a log fit
    p = LLMCarbonBaseline().fit(samples + [zero])
    assert p.efficiency == pytest.approx(u_true, rel=1e-9)
    assert (p.n_fit_rows, p.n_fit_skipped) == (len(samples), 1)
    out = p.predict(samples)
    np.testing.assert_allclose(out["prefill"], [s.prefill_energy_j for s in samples], rtol=1e-9)
    np.testing.assert_allclose(out["decode"], [s.decode_energy_j for s in samples], rtol=1e-9)
    np.testing.assert_allclose(out["request"], out["prefill"] + out["decode"], rtol=1e-12)


def test_llmcarbon_ignores_memory_traffic():
    # Two requests with the same FLOPs but different bytes get the same LLMCarbon energy.
    s = make_sample("tiny-llama", 1, 128, 10)
    more_bytes = dataclasses.replace(s, totals={**s.totals, "decode_bytes": 1e3 * s.totals["decode_bytes"]})
    p = LLMCarbonBaseline().fit([relabel(s, 1.0, 2.0)])
    assert p.predict([s])["request"][0] == p.predict([more_bytes])["request"][0]


def test_llmcarbon_predict_before_fit_raises():
    with pytest.raises(RuntimeError, match="before fit"):
        LLMCarbonBaseline().predict([make_sample("tiny-llama", 1, 16, 2)])


# ---------------------------------------------------------------------------------------------- features

def test_flat_features_have_no_hardware_and_no_phase_split():
    a = make_sample("small-llama", 2, 300, 40, gpu="NVIDIA H200")
    b = make_sample("small-llama", 2, 300, 40, gpu="NVIDIA L4")
    fa, fb = flat_features([a]), flat_features([b])
    assert fa.shape == (1, len(FLAT_FEATURE_NAMES))
    np.testing.assert_array_equal(fa, fb)  # the GPU does not enter
    assert not any("peak" in n or "bw" in n or "tdp" in n or "gpu" in n for n in FLAT_FEATURE_NAMES)
    assert not any(n.startswith(("log_prefill", "log_decode")) for n in FLAT_FEATURE_NAMES)
    i = FLAT_FEATURE_NAMES.index("log_request_flops")
    assert fa[0, i] == pytest.approx(math.log1p(a.totals["prefill_flops"] + a.totals["decode_flops"]))


def test_nnlqp_node_features_sum_prefill_and_decode():
    s = make_sample("tiny-qwen2", 3, 200, 25)
    x = nnlqp_node_features(s)
    assert x.shape == (s.node_x.shape[0], len(NNLQP_NODE_FEATURE_NAMES))
    # Independent reference: the graph's own per-node costs of both phases.
    template, _ = template_for_record(s.record)
    pre = template.costs(Segment.prefill(3, 200))
    dec = template.costs(Segment.decode(3, 200, 25))
    for name, attr in (("request_log_ops", "ops"), ("request_log_mem_bytes", "memory_bytes"),
                       ("request_log_net_bytes", "network_bytes")):
        want = np.log1p(getattr(pre, attr)[0] + getattr(dec, attr)[0])
        np.testing.assert_allclose(x[:, NNLQP_NODE_FEATURE_NAMES.index(name)], want, rtol=1e-9, atol=1e-12)
    assert not any("perf" in n or "time" in n for n in NNLQP_NODE_FEATURE_NAMES)


# ---------------------------------------------------------------------------------------------- learned baselines

def _learnable_split(seed):
    """Request energy = 2e-9 J/FLOP + 3e-10 J/byte: an exact function of the flat features."""
    def label(samples):
        out = []
        for s in samples:
            e = 2e-9 * (s.totals["prefill_flops"] + s.totals["decode_flops"]) + 3e-10 * (
                s.totals["prefill_bytes"] + s.totals["decode_bytes"])
            out.append(relabel(s, 0.25 * e, 0.75 * e))
        return out
    return label(grid(seed=seed, n_per_model=25)), label(grid(seed=seed + 100, n_per_model=6))


def _constant_mape(train, test):
    const = math.exp(np.mean([math.log(s.request_energy_j) for s in train]))
    return mape([const] * len(test), [s.request_energy_j for s in test])


def test_random_forest_learns_a_learnable_relation():
    train, test = _learnable_split(seed=2)
    p = RandomForestBaseline(seed=0).fit(train)
    out = p.predict(test)
    assert out["prefill"] is None and out["decode"] is None
    got = mape(out["request"], [s.request_energy_j for s in test])
    assert got < 0.25 * _constant_mape(train, test)
    # seeded: the same seed gives the same forest
    np.testing.assert_array_equal(out["request"], RandomForestBaseline(seed=0).fit(train).predict(test)["request"])


def test_nnlqp_learns_a_learnable_relation_and_is_seeded(one_torch_thread):
    train, test = _learnable_split(seed=3)
    cfg = TrainConfig(epochs=400, warmup_epochs=150)
    p = NNLQPBaseline(seed=0, config=cfg).fit(train)
    out = p.predict(test)
    assert out["prefill"] is None and out["decode"] is None
    got = mape(out["request"], [s.request_energy_j for s in test])
    assert got < 0.3 * _constant_mape(train, test)
    again = NNLQPBaseline(seed=0, config=cfg).fit(train).predict(test)["request"]
    np.testing.assert_allclose(out["request"], again, rtol=1e-6)
    assert p.model.outputs == 1


def test_nnlqp_output_is_per_layer_when_layer_scaled(one_torch_thread):
    import torch

    train, test = _learnable_split(seed=5)
    p = NNLQPBaseline(seed=0, config=TrainConfig(epochs=5, warmup_epochs=5, layer_scaled=True)).fit(train[:20])
    s = test[0]  # small-llama: 4 layers
    x = p.standardizer.nodes(nnlqp_node_features(s))
    g = p.standardizer.globals(flat_features([s]))
    with torch.no_grad():
        raw = p.model(torch.tensor(x, dtype=torch.float32), torch.tensor(s.edge_index),
                      torch.zeros(x.shape[0], dtype=torch.long), torch.tensor(g, dtype=torch.float32))[0, 0]
    assert s.layers == ARCHS[s.model]["num_hidden_layers"]
    assert p.predict([s])["request"][0] == pytest.approx(s.layers * math.exp(float(raw)), rel=1e-6)


def test_gnn_wrapper_gives_phases_that_add_up(one_torch_thread):
    train, test = _learnable_split(seed=4)
    p = GNNPredictor(seed=0, config=TrainConfig(epochs=30, warmup_epochs=10)).fit(train[:30])
    out = p.predict(test[:5])
    assert out["prefill"].shape == (5,) and out["decode"].shape == (5,)
    np.testing.assert_allclose(out["request"], out["prefill"] + out["decode"])
    assert p.config.epochs == 30 and p.config.seed == 0


# ---------------------------------------------------------------------------------------------- factory

@pytest.mark.parametrize("name,cls,phases", [("gnn", GNNPredictor, True), ("llmcarbon", LLMCarbonBaseline, True),
                                             ("random-forest", RandomForestBaseline, False),
                                             ("nnlqp", NNLQPBaseline, False)])
def test_make_predictor(name, cls, phases):
    p = make_predictor(name, seed=7)
    assert isinstance(p, cls) and isinstance(p, EnergyPredictor)
    assert p.name == name and p.has_phases is phases and p.seed == 7


def test_make_predictor_rejects_unknown_name():
    assert PREDICTOR_NAMES == ("gnn", "llmcarbon", "random-forest", "nnlqp")
    with pytest.raises(ValueError, match="unknown predictor 'xgboost'.*random-forest"):
        make_predictor("xgboost")
