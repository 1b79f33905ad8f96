"""evaluate() numbers by hand, excluded rows, and the leave-one-architecture-out split."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmco2_serve.predictors.dataset import sample_from_record
from llmco2_serve.predictors.evaluate import EXCLUSION_REASONS, evaluate, leave_one_architecture_out
from llmco2_serve.prediction.records import parse_record

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1000, attn_impl="sdpa")


def row(model, prefill_j, decode_j, request_j, gen_tokens=5, prompt_len=64, batch=1):
    return dict(model=model, arch=ARCH, dtype="bfloat16", gpu="NVIDIA H200", n_gpu=1, batch=batch,
                prompt_len=prompt_len, gen_tokens=gen_tokens, prefill_energy_j=prefill_j, decode_energy_j=decode_j,
                request_energy_j=request_j)


def sample(*args, **kw):
    return sample_from_record(parse_record(row(*args, **kw), "synthetic"))


@pytest.fixture
def four_rows():
    # model, prefill, decode, request, gen_tokens
    return [
        sample("a", 5.0, 0.0, 10.0, gen_tokens=1),    # decode empty: 0 J by definition
        sample("a", 10.0, -1.0, 20.0, gen_tokens=5),  # decode counter noise
        sample("b", 20.0, 20.0, 40.0, gen_tokens=5),
        sample("b", 2.0, 0.0, 0.0, gen_tokens=5),     # request counter did not advance; decode 0 J over 4 steps
    ]


def test_request_metrics_by_hand(four_rows):
    pred = {"prefill": None, "decode": None, "request": np.array([10.4, 21.5, 50.0, 5.0])}
    r = evaluate(pred, four_rows)
    # relative errors 0.04, 0.075, 0.25; the fourth row (measured 0 J) is excluded
    assert r["n"] == 3
    assert r["mape"] == pytest.approx((0.04 + 0.075 + 0.25) / 3)
    assert (r["eba_5"], r["eba_10"], r["eba_30"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert r["excluded"] == {"count": 1, "reasons": {"measured_zero": 1}}
    a, b = r["per_model"]["a"], r["per_model"]["b"]
    assert (a["n"], a["mape"], a["eba_5"], a["eba_10"], a["eba_30"]) == pytest.approx((2, 0.0575, 0.5, 1.0, 1.0))
    assert (b["n"], b["mape"], b["eba_5"], b["eba_10"], b["eba_30"]) == pytest.approx((1, 0.25, 0.0, 0.0, 1.0))
    assert a["excluded"]["count"] == 0 and b["excluded"] == {"count": 1, "reasons": {"measured_zero": 1}}
    assert r["prefill"] is None and r["decode"] is None  # no phase split given
    json.dumps(r, allow_nan=False)


def test_phase_metrics_and_exclusion_reasons(four_rows):
    pred = {"prefill": np.array([5.2, 10.0, 10.0, 2.0]), "decode": np.array([0.3, 1.0, 23.0, 1.0]),
            "request": np.array([10.0, 20.0, 40.0, 1.0])}
    r = evaluate(pred, four_rows)
    p = r["prefill"]
    assert p["n"] == 4 and p["excluded"]["count"] == 0
    assert p["mape"] == pytest.approx((0.04 + 0 + 0.5 + 0) / 4)
    assert (p["eba_5"], p["eba_10"], p["eba_30"]) == pytest.approx((0.75, 0.75, 0.75))
    d = r["decode"]
    assert d["n"] == 1 and d["mape"] == pytest.approx(0.15)
    assert (d["eba_5"], d["eba_10"], d["eba_30"]) == (0.0, 0.0, 1.0)
    assert d["excluded"] == {"count": 3, "reasons": {"measured_negative": 1, "measured_zero": 1, "no_decode_steps": 1}}
    assert set(d["excluded"]["reasons"]) <= set(EXCLUSION_REASONS)
    assert d["per_model"]["a"]["n"] == 0 and d["per_model"]["a"]["mape"] is None  # nothing left to score
    assert d["per_model"]["b"]["mape"] == pytest.approx(0.15)
    assert r["mape"] == 0.0 and r["eba_5"] == 1.0
    json.dumps(r, allow_nan=False)


def test_evaluate_rejects_misaligned_or_non_finite_predictions(four_rows):
    with pytest.raises(ValueError, match=r"predicted\['request'\] has shape \(3,\)"):
        evaluate({"request": np.ones(3)}, four_rows)
    with pytest.raises(ValueError, match=r"predicted\['prefill'\]\[2\] is nan \(model 'b'\)"):
        evaluate({"request": np.ones(4), "prefill": np.array([1, 1, np.nan, 1.0]), "decode": np.ones(4)}, four_rows)
    with pytest.raises(ValueError, match="no 'request'"):
        evaluate({"prefill": np.ones(4)}, four_rows)


class SpyPredictor:
    """Records what it was trained on; predicts each sample's prompt length (to check alignment)."""

    name = "spy"
    has_phases = False
    fits: list = []

    def __init__(self, seed):
        self.seed = seed

    def fit(self, samples):
        SpyPredictor.fits.append(sorted({s.model for s in samples}))
        return self

    def predict(self, samples):
        return {"prefill": None, "decode": None, "request": np.array([float(s.record.prompt_len) for s in samples])}


def test_loao_never_trains_on_the_held_out_model():
    models = ["m1", "m2", "m3"]
    samples = [sample(m, 1.0, 1.0, 2.0, prompt_len=10 * i + j + 1) for i, m in enumerate(models) for j in range(3)]
    samples = samples[::2] + samples[1::2]  # interleave models so alignment is not trivial
    SpyPredictor.fits = []
    preds, folds = leave_one_architecture_out(samples, "spy", seed=3, make=lambda name, seed: SpyPredictor(seed))
    assert [f["held_out"] for f in folds] == list(dict.fromkeys(s.model for s in samples))
    for fold, seen in zip(folds, SpyPredictor.fits):
        assert fold["held_out"] not in seen
        assert seen == fold["train_models"] == sorted(set(models) - {fold["held_out"]})
        assert fold["n_train"] + fold["n_test"] == len(samples)
    np.testing.assert_array_equal(preds["request"], [s.record.prompt_len for s in samples])
    assert preds["prefill"] is None and preds["decode"] is None


def test_loao_with_llmcarbon_recovers_an_exact_efficiency():
    from llmco2_serve.predictors.baselines import llmcarbon_energy_j

    samples = []
    for m in ("m1", "m2", "m3"):
        for b, l, g in ((1, 64, 8), (4, 512, 32), (2, 1024, 3)):
            s = sample(m, 1.0, 1.0, 2.0, gen_tokens=g, prompt_len=l, batch=b)
            pre = llmcarbon_energy_j(s.totals["prefill_flops"], 989.4e12, 700.0, 1, 0.25)
            dec = llmcarbon_energy_j(s.totals["decode_flops"], 989.4e12, 700.0, 1, 0.25)
            samples.append(dataclasses.replace(s, prefill_energy_j=pre, decode_energy_j=dec, request_energy_j=pre + dec))
    preds, folds = leave_one_architecture_out(samples, "llmcarbon")
    r = evaluate(preds, samples)
    assert r["mape"] == pytest.approx(0.0, abs=1e-9) and r["eba_5"] == 1.0
    assert r["prefill"]["mape"] == pytest.approx(0.0, abs=1e-9) and r["decode"]["eba_5"] == 1.0
    assert len(folds) == 3


def test_loao_needs_two_models():
    with pytest.raises(ValueError, match="at least 2 models"):
        leave_one_architecture_out([sample("m1", 1.0, 1.0, 2.0)], "llmcarbon")


def test_accuracy_benchmark_runs_on_a_small_file(tmp_path):
    data = tmp_path / "energy.jsonl"
    rows = [row(m, 1.0 + i, 2.0 * i, 1.0 + 3.0 * i, prompt_len=32 * (i + 1), gen_tokens=i + 2)
            for m in ("m1", "m2") for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "acc.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accuracy.py"), "--data", str(data),
                           "--predictors", "llmcarbon", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Table 3" in proc.stdout and "Table 4" in proc.stdout and "| LLMCarbon |" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["models"] == ["m1", "m2"]
    assert [f["held_out"] for f in saved["results"]["llmcarbon"]["folds"]] == ["m1", "m2"]
    assert saved["results"]["llmcarbon"]["evaluation"]["n"] == 8
