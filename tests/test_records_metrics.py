import json

import pytest

from llmco2_serve.reporting import metrics
from llmco2_serve.prediction.records import RecordError, load_records

ROW = {"model": "m", "arch": {"model_type": "llama"}, "dtype": "bfloat16", "gpu": "NVIDIA H200", "n_gpu": 1,
       "batch": 1, "prompt_len": 10, "gen_tokens": 2, "request_energy_j": 3.0}


def test_mape_and_eba_hand_computed():
    pred, meas = [110, 80, 100, 5], [100, 100, 100, 0]  # errors 10%, 20%, 0%; the zero row is excluded
    assert metrics.mape(pred, meas) == pytest.approx(0.1)
    assert metrics.eba(pred, meas, 0.05) == pytest.approx(1 / 3)
    assert metrics.eba(pred, meas, 0.10) == pytest.approx(2 / 3)
    s = metrics.summary(pred, meas)
    assert s["n"] == 3 and s["n_excluded_zero"] == 1 and s["eba_30"] == 1.0


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: r.pop("gpu"), "missing field 'gpu'"),
    (lambda r: r.update(batch=0), "'batch' must be >= 1"),
    (lambda r: r.update(prompt_len="ten"), "'prompt_len' must be a finite number"),
    (lambda r: r.update(arch=[]), "'arch' must be an object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, mutate, needle):
    bad = dict(ROW)
    mutate(bad)
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(ROW) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=rf"r.jsonl:3: .*{needle}"):
        load_records(p)


def test_invalid_json_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("{not json\n")
    with pytest.raises(RecordError, match="r.jsonl:1: not valid JSON"):
        load_records(p)
