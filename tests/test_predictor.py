"""Predictor.from_config(...).predict(...): the one entry point."""

import json

import numpy as np
import pytest

from llmco2_serve.workload.arch import ArchitectureError
from llmco2_serve.carbon.footprint import CarbonSettings, operational_co2_g
from llmco2_serve.hardware.gpus import UnknownGPUError
from llmco2_serve.prediction.predictor import Predictor

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_config(LLAMA_8B, gpu="NVIDIA H100 80GB HBM3")


def test_phases_add_up_and_carbon_follows_eq1(predictor):
    p = predictor.predict(prompt_len=1000, gen_tokens=100)
    assert p.energy_j == pytest.approx(p.prefill_energy_j + p.decode_energy_j)
    assert p.prefill_energy_j > 0 and p.decode_energy_j > 0
    s = CarbonSettings()
    assert p.operational_co2_g == pytest.approx(operational_co2_g(p.energy_j, s.pue, s.intensity_g_per_kwh))
    assert p.co2_g == pytest.approx(p.operational_co2_g + p.embodied_co2_g)
    assert p.inputs["gpu"] == "H100-SXM-80GB" and p.inputs["prompt_len"] == 1000


def test_single_token_has_no_decode(predictor):
    p = predictor.predict(prompt_len=500, gen_tokens=1)
    assert p.decode_energy_j == 0.0 and p.decode_time_s == 0.0


def test_energy_grows_with_work(predictor):
    base = predictor.predict(prompt_len=500, gen_tokens=50).energy_j
    assert predictor.predict(prompt_len=500, gen_tokens=400).energy_j > base
    assert predictor.predict(prompt_len=500, gen_tokens=50, batch=8).energy_j > base


def test_predict_many_matches_predict(predictor):
    L = np.array([17, 900, 3000])
    N = np.array([1, 33, 250])
    many = predictor.predict_many(L, N)
    for i in range(3):
        one = predictor.predict(prompt_len=int(L[i]), gen_tokens=int(N[i]))
        assert many.energy_j[i] == pytest.approx(one.energy_j)
        assert many.co2_g[i] == pytest.approx(one.co2_g)


def test_intensity_scales_operational_carbon():
    lo = Predictor.from_config(LLAMA_8B, gpu="h100", carbon=CarbonSettings(intensity_g_per_kwh=100.0))
    hi = Predictor.from_config(LLAMA_8B, gpu="h100", carbon=CarbonSettings(intensity_g_per_kwh=400.0))
    a, b = lo.predict(prompt_len=10, gen_tokens=5), hi.predict(prompt_len=10, gen_tokens=5)
    assert b.operational_co2_g == pytest.approx(4 * a.operational_co2_g)
    assert b.embodied_co2_g == pytest.approx(a.embodied_co2_g)


def test_tensor_parallel_adds_network_bytes():
    one = Predictor.from_config(LLAMA_8B, gpu="h100").predict(prompt_len=100, gen_tokens=10)
    four = Predictor.from_config(LLAMA_8B, gpu="h100", n_gpu=4).predict(prompt_len=100, gen_tokens=10)
    assert one.totals["network_bytes"] == 0
    assert four.totals["network_bytes"] > 0
    assert four.totals["prefill_flops"] == pytest.approx(one.totals["prefill_flops"], rel=1e-3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_inputs_are_rejected(predictor, bad):
    with pytest.raises(ValueError, match="gen_tokens"):
        predictor.predict(prompt_len=10, gen_tokens=bad)


def test_unknown_gpu_and_bad_config_errors():
    with pytest.raises(UnknownGPUError):
        Predictor.from_config(LLAMA_8B, gpu="NVIDIA GeForce 256")
    with pytest.raises(ArchitectureError, match="hidden_size"):
        Predictor.from_config({k: v for k, v in LLAMA_8B.items() if k != "hidden_size"}, gpu="h100")


def test_model_folder_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    p = Predictor.from_config(tmp_path, gpu="a100", dtype="int4")
    assert p.precision.weight_bytes == 0.5
    assert p.predict(prompt_len=10, gen_tokens=2).inputs["dtype"] == "w:int4/a:bfloat16"


def test_step_costs_rank_work(predictor):
    c = predictor.step_costs(np.array([512, 1, 1]), np.array([0, 100, 4000]))
    assert c[0] > c[2] > c[1] > 0


def test_bf16_model_on_t4_is_priced_in_fp16():
    from llmco2_serve.hardware.gpus import gpu_spec

    p = Predictor.from_config(LLAMA_8B, gpu="Tesla T4")
    assert p._template.peak_ops_per_s == gpu_spec("t4").peak_flops_per_s("float16")
    assert p.predict(prompt_len=100, gen_tokens=10).energy_j > 0


def test_predict_phases_are_the_parts_of_predict_many(predictor):
    # the table (fast_predict.py) tabulates these parts; they must be what predict_many sums
    prompts, gens = np.array([1, 17, 300, 2048, 5]), np.array([1, 2, 64, 700, 1])
    batches = np.array([1, 3, 8, 64, 256])
    pre, dec, pre_t, dec_t = predictor.predict_phases(prompts, gens, batches)
    for i, b in enumerate(batches.tolist()):
        many = predictor.predict_many(prompts[i:i + 1], gens[i:i + 1], batch=b)
        assert pre[i] == pytest.approx(many.prefill_energy_j[0], rel=1e-12)
        assert dec[i] == pytest.approx(many.decode_energy_j[0], rel=1e-12)
        assert pre_t[i] + dec_t[i] == pytest.approx(many.time_s[0], rel=1e-12)
        assert (pre[i] + dec[i]) * predictor.co2_g_per_j + (pre_t[i] + dec_t[i]) * predictor.embodied_co2_g_per_s \
            == pytest.approx(many.co2_g[0], rel=1e-12)
    assert dec[0] == dec_t[0] == 0.0 and dec[4] == 0.0  # one output token: no decode step
    single = predictor.predict(prompt_len=300, gen_tokens=64, batch=8)
    assert pre_t[2] == pytest.approx(single.prefill_time_s) and dec_t[2] == pytest.approx(single.decode_time_s)
