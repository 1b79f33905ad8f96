"""``benchmarks/compare_overhead_runs.py``: pooling runs' pairs and telling on/off from A/A.

Truth from construction: pair ratios drawn from two known distributions (the same one, or one
shifted by 10 %), written in ``serving_overhead.py --json``'s shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def compare():
    return load_benchmark("compare_overhead_runs.py", "compare_overhead_runs_under_test")


def _run(tmp_path: Path, name: str, ratios, deltas) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"summary": {"pair_ratios": list(ratios), "pair_api_cpu_delta_ms": list(deltas)}}))
    return path


def test_runs_are_pooled_pair_by_pair(compare, tmp_path):
    a = _run(tmp_path, "a.json", [0.9, 1.0], [0.1, 0.2])
    b = _run(tmp_path, "b.json", [1.1], [0.3])
    assert compare.pooled([a, b]) == {"ratios": [0.9, 1.0, 1.1], "api_ms": [0.1, 0.2, 0.3]}


def test_a_real_cost_is_told_from_the_control_and_noise_is_not(compare, tmp_path, capsys):
    rng = np.random.default_rng(3)
    noise = lambda: np.exp(rng.normal(0.0, 0.08, 20))  # noqa: E731 - one noisy pair here
    aa = [_run(tmp_path, "aa.json", noise(), rng.normal(0.0, 0.1, 20))]
    same = [_run(tmp_path, f"same{i}.json", noise(), rng.normal(0.0, 0.1, 20)) for i in range(2)]
    costly = [_run(tmp_path, f"cost{i}.json", 0.85 * noise(), rng.normal(0.3, 0.1, 20)) for i in range(2)]
    assert compare.differ_p(compare.pooled(same)["ratios"], compare.pooled(aa)["ratios"]) > 0.05
    assert compare.differ_p(compare.pooled(costly)["ratios"], compare.pooled(aa)["ratios"]) < 0.01
    assert compare.differ_p(compare.pooled(costly)["api_ms"], compare.pooled(aa)["api_ms"]) < 0.01
    assert compare.main([str(p) for p in costly] + ["--aa", str(aa[0])]) == 0
    out = capsys.readouterr().out
    assert "n 40" in out and "Mann-Whitney p = 0.00" in out
