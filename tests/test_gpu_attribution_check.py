"""benchmarks/gpu_attribution_check.py: its dry run (simulated GPU with a known power model)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_attribution_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_attribution_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


gac = _load()


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    rep = gac.main(["--dry-run", "--out", str(out), "--duration-s", "20"])
    return out, rep


def test_dry_run_writes_report_files_with_expected_keys(dry_report):
    out, rep = dry_report
    data = json.loads((out / "report.json").read_text())
    assert {"mode", "gpu_name", "workloads", "config", "idle", "update_period", "alone",
            "phase_a", "attribution", "runtime_s"} <= set(data)
    assert data["mode"] == "dry-run"
    assert set(data["attribution"]) == {"flops", "oracle", "oracle_weight_split"}
    for res in data["attribution"].values():
        assert {"requests", "workloads", "conservation", "additivity", "summary"} <= set(res)
        assert len(res["requests"]) == data["phase_a"]["n_instances"]
        assert {"attributed_j", "uncertainty_j", "expected_total_j", "rel_error",
                "within_uncertainty", "expected_dynamic_j", "rel_error_dynamic"} <= set(
            res["requests"][0])
    text = (out / "report.txt").read_text()
    assert "conservation:" in text and "OK" in text and "simulated GPU" in text


def test_dry_run_idle_power_and_update_period_match_the_model(dry_report):
    _, rep = dry_report
    assert rep["idle"]["power_w"] == pytest.approx(gac._DRY_IDLE_POWER_W, rel=1e-3)
    assert rep["update_period"]["median_s"] == pytest.approx(0.1, abs=0.003)


def test_dry_run_alone_energy_matches_the_power_model(dry_report):
    _, rep = dry_report
    for w, a in zip(rep["workloads"], rep["alone"]):
        thr = gac._DRY_THROUGHPUT_FLOP_S[w["n"]]
        tau_s = w["flops_per_step"] / thr + gac._DRY_HOST_GAP_S
        e_step_j = gac._DRY_ENERGY_PER_FLOP_J * w["flops_per_step"] + (
            gac._DRY_IDLE_POWER_W * gac._DRY_HOST_GAP_S)
        # e.g. mm8192x2: 700 W / 600 TFLOP/s * 2.199 TFLOP + 70 W * 50 us = 2.569 J
        assert a["time_per_step_s"] == pytest.approx(tau_s, rel=0.01)
        assert a["energy_per_step_j"] == pytest.approx(e_step_j, rel=0.01)
        assert a["dynamic_energy_per_step_j"] == pytest.approx(
            e_step_j - gac._DRY_IDLE_POWER_W * tau_s, rel=0.015)
    mm8192 = rep["alone"][3]["energy_per_step_j"]
    assert mm8192 == pytest.approx(700.0 / 600e12 * 2 * 2 * 8192**3 + 70 * 5e-5, rel=0.01)


def test_dry_run_conservation_holds(dry_report):
    _, rep = dry_report
    for res in rep["attribution"].values():
        c = res["conservation"]
        assert c["holds"]
        assert c["attributed_j"] + c["idle_j"] == pytest.approx(c["counter_delta_j"], abs=1e-6)
        assert c["total_j"] == pytest.approx(c["counter_delta_j"], abs=1e-6)
        # the global idle gap in phase A went to idle, not to requests
        assert c["idle_j"] >= 0.5 * gac._DRY_IDLE_POWER_W


def test_dry_run_attribution_is_within_uncertainty_of_the_known_truth(dry_report):
    _, rep = dry_report
    for name, res in rep["attribution"].items():
        for r in res["requests"]:
            assert r["final"], (name, r["request_id"])
            assert r["within_uncertainty"], (name, r)
            # the model's energy is proportional to FLOPs, so every weighting should be close
            assert abs(r["rel_error"]) <= 0.03, (name, r)
        assert abs(res["additivity"]["rel_error"]) <= 0.01


def test_wrong_weights_are_caught_outside_uncertainty():
    be = gac.DryBackend([gac.Workload(f"mm{n}x{r}", n, r) for n, r in gac.DEFAULT_WORKLOADS])
    wl = [gac.Workload(f"mm{n}x{r}", n, r) for n, r in gac.DEFAULT_WORKLOADS]
    log = gac._ChangeLog()
    passes = [[gac.measure_alone(be, w, 2.0, log)] for w in wl]
    alone = [gac.alone_summary(p, gac._DRY_IDLE_POWER_W) for p in passes]
    # Equal weights although mm8192x2 costs 4x mm2048x32: the check must flag it.
    cfg = [gac.AttributorConfig("equal", (1.0, 1.0, 1.0, 1.0), "duration")]
    sched = gac.make_schedule(len(wl), 10.0)
    pa = gac.run_phase_a(be, wl, sched, cfg, 10.0)
    res = gac.compare(pa, sched, wl, alone, gac._DRY_IDLE_POWER_W, cfg)["equal"]
    assert res["conservation"]["holds"]
    assert res["summary"]["n_within_uncertainty"] < res["summary"]["n_requests"] // 2
    by_w = {w["workload"]: w["rel_error"] for w in res["workloads"]}
    assert by_w["mm8192x2"] < -0.2 and by_w["mm2048x32"] > 0.2


def test_schedule_has_joins_leaves_and_a_global_gap():
    sched = gac.make_schedule(4, 60.0, seed=0)
    assert sched == gac.make_schedule(4, 60.0, seed=0)
    assert {s.k for s in sched} == {0, 1, 2, 3}
    assert len(sched) > 4  # some workload leaves and comes back
    assert not any(s.start_s < 30.0 < s.end_s for s in sched)  # nothing runs mid-phase
    assert all(s.end_s - s.start_s >= 3.0 for s in sched)  # >= 5% of the phase each


def test_dry_run_imports_neither_torch_nor_vllm(tmp_path):
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['g'] = m\n"
        "spec.loader.exec_module(m)\n"
        f"m.main(['--dry-run', '--out', {str(tmp_path)!r}, '--duration-s', '4',"
        " '--alone-s', '1', '--idle-s', '0.5'])\n"
        "assert 'torch' not in sys.modules and 'vllm' not in sys.modules, 'imported'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "report.json").exists()


def test_without_cuda_and_without_dry_run_exits_with_a_clear_message(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        gac.main(["--out", str(tmp_path)])
    assert "CUDA is not available" in str(e.value) and "--dry-run" in str(e.value)
    assert not (tmp_path / "report.json").exists()


def test_json_has_no_nan():
    assert gac._json_safe({"a": [math.nan, 1.0], "b": math.inf}) == {"a": [None, 1.0], "b": None}
