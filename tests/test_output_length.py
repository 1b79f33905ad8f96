import csv
import json
import pathlib

import pytest

from llmco2_serve.workload.output_length import OutputLengthModel, OutputPrior, load_azure_prior

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "azure-llm-trace-2023"


def test_packaged_prior_has_provenance_and_values():
    from importlib import resources
    doc = json.loads(resources.files("llmco2_serve.data").joinpath("azure_output_prior.json").read_text())
    assert doc["license"] == "CC-BY 4.0" and "Splitwise" in doc["citation"] and "AzurePublicDataset" in doc["source"]
    conv = doc["traces"]["conversation"]
    assert conv["n_requests"] == 19366 and doc["traces"]["code"]["n_requests"] == 8819
    p = load_azure_prior()
    assert p.mean_tokens == conv["generated_tokens"]["mean"]
    assert p.median_tokens == conv["generated_tokens"]["quantiles"]["0.5"]
    assert "conversation" in p.source


@pytest.mark.skipif(not SHARED.exists(), reason="shared data not present")
def test_prior_matches_the_trace():
    with open(SHARED / "AzureLLMInferenceTrace_conv.csv") as f:
        gen = [int(r["GeneratedTokens"]) for r in csv.DictReader(f)]
    assert load_azure_prior().mean_tokens == pytest.approx(sum(gen) / len(gen), abs=1e-3)


def test_estimate_uses_prior_and_caps_at_max_tokens():
    m = OutputLengthModel(OutputPrior(200.0, 100.0, "test"))
    e = m.estimate("llama", 1000)
    assert (e.expected_tokens, e.upper_tokens, e.source) == (200, 1000, "prior")
    e = m.estimate("llama", 50)
    assert (e.expected_tokens, e.upper_tokens) == (50, 50)
    with pytest.raises(ValueError, match="max_tokens"):
        m.estimate("llama", 0)


def test_online_learning_running_mean_then_ewma():
    m = OutputLengthModel(OutputPrior(200.0, 100.0, "test"), alpha=0.1, prior_weight=5)
    m.observe("a", 20)  # step 1/6: (5*200 + 20) / 6 = 170
    assert m.mean_tokens("a") == pytest.approx(170.0)
    m.observe("a", 100)  # step 1/7: 170 + (100 - 170)/7 = 160
    assert m.mean_tokens("a") == pytest.approx(160.0)
    for _ in range(3):
        m.observe("a", 160)  # steps 1/8, 1/9, 1/10: no change
    m.observe("a", 60)  # step max(0.1, 1/11) = 0.1: 160 - 10 = 150
    assert m.mean_tokens("a") == pytest.approx(150.0)
    assert m.observations("a") == 6
    assert m.estimate("a", 1000).source == "learned"
    assert m.mean_tokens("b") == 200.0  # per model


def test_observation_is_capped_by_max_tokens():
    m = OutputLengthModel(OutputPrior(200.0, 100.0, "test"), prior_weight=1)
    m.observe("a", 10**6, max_tokens=100)  # step 1/2: (200 + 100) / 2
    assert m.mean_tokens("a") == pytest.approx(150.0)
    with pytest.raises(ValueError):
        m.observe("a", -1)


def test_parameter_validation():
    with pytest.raises(ValueError, match="alpha"):
        OutputLengthModel(OutputPrior(2.0, 1.0, "t"), alpha=0)
    with pytest.raises(ValueError, match="prior_weight"):
        OutputLengthModel(OutputPrior(2.0, 1.0, "t"), prior_weight=0.5)
    with pytest.raises(ValueError, match="mean_tokens"):
        OutputPrior(0.5, 1.0, "t")
