"""The prediction table (the API server's hot path) against the GNN it tabulates.

The truth is :meth:`Predictor.predict_many` itself, evaluated directly at random points the table
never saw: the table may differ from it only by its interpolation error, which is bounded here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmco2_serve.prediction.fast_predict import PredictionTable, log_grid
from llmco2_serve.prediction.predictor import Predictor
from llmco2_serve.devtools.tinymodel import tiny_config

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}
MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8,
           "num_experts_per_tok": 2, "torch_dtype": "bfloat16"}

# Interpolation bound on the share's energy, CO2 and each phase (the GNN itself is ~24 % MAPE
# against measurements, so a table error of this size does not change what a user sees).
MAX_REL_ERROR = 0.02
P99_REL_ERROR = 0.01


@pytest.fixture(scope="module", params=[
    ("tiny-llama", {**tiny_config("llama"), "torch_dtype": "float32"}, "h100", 1, 64, 512),
    ("llama-3.1-8b", LLAMA_8B, "a100-80gb", 1, 256, 8192),
    ("mixtral-tp2", MIXTRAL, "h100", 2, 128, 4096),
], ids=lambda p: p[0])
def case(request):
    name, cfg, gpu, tp, max_batch, max_len = request.param
    predictor = Predictor.from_config(cfg, gpu=gpu, tensor_parallel=tp)
    table = PredictionTable(predictor, max_batch=max_batch, max_prompt_len=max_len, max_gen_tokens=max_len,
                            check_points=0)
    return predictor, table


def _random_points(table, n, seed):
    rng = np.random.default_rng(seed)

    def draw(hi):  # log-uniform: small values are as common as large ones
        return np.clip(np.round(np.exp(rng.uniform(0, math.log(hi), n))).astype(int), 1, hi)

    return draw(table.max_batch), draw(table.max_prompt_len), draw(table.max_gen_tokens)


def test_table_matches_the_gnn_between_grid_nodes(case):
    predictor, table = case
    b, l, g = _random_points(table, 600, seed=12345)
    errors = {"energy": [], "prefill": [], "decode": [], "co2": [], "time": []}
    for bi, li, gi in zip(b.tolist(), l.tolist(), g.tolist()):
        exact = predictor.predict_many(np.array([li]), np.array([gi]), batch=bi)
        got = table.share(bi, li, gi)
        pairs = {"energy": (got.energy_j, exact.energy_j[0]), "prefill": (got.prefill_energy_j, exact.prefill_energy_j[0]),
                 "co2": (got.co2_g, exact.co2_g[0]), "time": (got.time_s, exact.time_s[0])}
        if gi > 1:
            pairs["decode"] = (got.decode_energy_j, exact.decode_energy_j[0])
        else:
            assert got.decode_energy_j == 0.0 and exact.decode_energy_j[0] == 0.0
        for k, (a, want) in pairs.items():
            errors[k].append(abs(a - float(want) / bi) / (float(want) / bi))
    for k, e in errors.items():
        e = np.array(e)
        assert e.max() <= MAX_REL_ERROR, (k, e.max())
        assert np.percentile(e, 99) <= P99_REL_ERROR, (k, np.percentile(e, 99))


def test_grid_nodes_are_the_gnn_itself(case):
    predictor, table = case
    for bi, li, gi in ((1, 1, 1), (1, 16, 1), (4, 128, 2), (8, 1, 64), (table.max_batch, table.max_prompt_len,
                                                                         table.max_gen_tokens)):
        exact = predictor.predict_many(np.array([li]), np.array([gi]), batch=bi)
        got = table.share(bi, li, gi)
        assert got.prefill_energy_j == pytest.approx(exact.prefill_energy_j[0] / bi, rel=1e-9)
        assert got.decode_energy_j == pytest.approx(exact.decode_energy_j[0] / bi, rel=1e-9)
        assert got.co2_g == pytest.approx(exact.co2_g[0] / bi, rel=1e-9)
        assert got.time_s == pytest.approx(exact.time_s[0] / bi, rel=1e-9)


def test_one_token_requests_have_no_decode_phase(case):
    predictor, table = case
    for li in (1, 7, 33, 300):
        s = table.share(3, li, 1)
        exact = predictor.predict_many(np.array([li]), np.array([1]), batch=3)
        assert s.decode_energy_j == 0.0 and s.decode_time_s == 0.0
        assert s.energy_j == pytest.approx(exact.energy_j[0] / 3, rel=MAX_REL_ERROR)


def test_shares_answers_several_lengths_at_once(case):
    _, table = case
    a, b = table.shares(5, 100, (20, 300))
    assert a == table.share(5, 100, 20) and b == table.share(5, 100, 300)
    assert b.energy_j > a.energy_j  # more output, more energy


def test_outside_the_grid_is_not_covered(case):
    _, table = case
    assert table.covers(1, 1, 1) and table.covers(table.max_batch, table.max_prompt_len, table.max_gen_tokens)
    assert not table.covers(table.max_batch + 1, 10, 10)
    assert not table.covers(1, table.max_prompt_len + 1, 10)
    assert not table.covers(1, 10, table.max_gen_tokens + 1)
    assert not table.covers(0, 10, 10)


def test_log_grid_nodes():
    g = log_grid(1000, 4)
    assert g[0] == 1 and g[-1] == 1000 and g == sorted(set(g))
    assert set(range(1, 9)) <= set(g)  # every small batch size is exact
    ratios = [b / a for a, b in zip(g, g[1:])]
    assert max(ratios[8:]) <= 2 ** 0.25 * 1.1  # ~19 % apart further up
    assert log_grid(1, 4) == [1] and log_grid(2, 1) == [1, 2]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            log_grid(bad, 4)
    with pytest.raises(ValueError):
        log_grid(10, 0)


def test_a_predictor_with_non_positive_output_is_refused():
    class Zero:
        co2_g_per_j = 1e-4
        embodied_co2_g_per_s = 1e-3

        def predict_phases(self, prompt_len, gen_tokens, batch):
            z = np.zeros(len(prompt_len))
            return z, z, z, z

    with pytest.raises(ValueError, match="non-positive"):
        PredictionTable(Zero(), max_batch=4, max_prompt_len=16, max_gen_tokens=16, check_points=0)


def test_build_reports_its_measured_error():
    predictor = Predictor.from_config({**tiny_config("llama"), "torch_dtype": "float32"}, gpu="h100")
    table = PredictionTable(predictor, max_batch=16, max_prompt_len=256, max_gen_tokens=256, check_points=64)
    assert 0 <= table.max_rel_error <= MAX_REL_ERROR and table.p99_rel_error <= table.max_rel_error
    assert "max relative error" in table.describe()
