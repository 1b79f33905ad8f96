"""benchmarks/gpu_attribution_check.py: its dry run (simulated GPU with a known power model).

The dry run's physics is ``SimGpuModel`` (per-kind durations and powers of its own, not the meter's
Roofline weights); the counter is ``FakeEnergyReader`` integrating it exactly. So the alone
measurements, the truths built from them and the counter's books can be checked against the model,
and the meter's split against truths it never saw.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_attribution_check.py"
SHORT = ["--busy-s", "3", "--idle-spell-s", "1.5", "--alone-s", "1", "--idle-s", "2", "--period-s", "0.5"]


gac = load_benchmark("gpu_attribution_check.py", "gpu_attribution_check")


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    rep = gac.main(["--dry-run", "--out", str(out), *SHORT])
    return out, rep


def _sim():
    return gac.SimGpuModel(gac.Shapes.from_config(gac.MODEL_CONFIG))


def _kinds():
    return {k.key: k for k in gac.Workload().kinds()}


def test_dry_run_writes_report_files_with_expected_structure(dry_report):
    out, rep = dry_report
    data = json.loads((out / "report.json").read_text())
    assert {"mode", "gpu_name", "predictor_gpu", "idle", "update_period", "kinds", "alone", "engine",
            "conservation", "additivity", "summary", "requests", "step_cost_model", "runtime_s"} <= set(data)
    assert data["mode"] == "dry-run" and data["complete"] is True
    assert {k["key"] for k in data["kinds"]} == set(data["alone"]) == set(data["step_cost_model"])
    for part in ("total", "prefill", "decode", "split_only", "dynamic", "first_answer"):
        assert {"n", "median_abs", "p90_abs", "median"} <= set(data["summary"][part]), part
        assert data["summary"][part]["n"] > 0, part
    assert {"coverage_1u", "coverage_2u", "median_rel_uncertainty"} <= set(data["summary"])
    assert {"median_s", "p10_s", "p90_s", "n", "reads"} <= set(data["update_period"]["tight_loop_idle"])
    assert {"finals_j", "idle_j", "unreported_j", "sum_j", "total_j", "counter_delta_j", "holds"} <= set(
        data["conservation"])
    scored = [r for r in data["requests"] if r["has_final"]]
    assert len(scored) == len(data["requests"]) == data["engine"]["requests"]
    assert {"energy_j", "uncertainty_j", "truth_j", "truth_prefill_j", "truth_decode_j", "rel_error",
            "rel_error_prefill", "rel_error_decode", "within_uncertainty", "counts", "shared_frac"} <= set(scored[0])
    text = (out / "report.txt").read_text()
    for needle in ("idle power (start", "counter update period, tight loop", "alone, per execution",
                   "meter final vs truth", "uncertainty coverage:", "conservation:", "additivity:"):
        assert needle in text, needle
    line = next(x for x in text.splitlines() if x.startswith("conservation:"))
    assert line.split("->")[1].strip().startswith("OK"), line


def test_dry_run_conservation_holds(dry_report):
    _, rep = dry_report
    c = rep["conservation"]
    assert c["holds"]
    assert c["finals_j"] + c["idle_j"] + c["unreported_j"] == pytest.approx(c["total_j"], abs=1e-6)
    assert c["total_j"] == pytest.approx(c["counter_delta_j"], abs=1e-6)
    assert c["live"] == 0 and c["pending"] == 0
    # the start-up idle and the idle spell (engine drained, idle ticks only) went to idle
    idle_s = sum(p["seconds"] for p in rep["engine"]["phases"] if p["phase"] == "idle")
    assert c["idle_j"] >= 0.9 * _sim().idle_w * idle_s
    assert c["total_j"] > 10 * c["idle_j"] > 0


def test_dry_run_idle_power_and_update_period_are_the_simulated_counters(dry_report):
    _, rep = dry_report
    assert rep["idle"]["power_w"] == pytest.approx(72.0, rel=1e-3)
    assert rep["idle"]["end"]["power_w"] == pytest.approx(72.0, rel=1e-3)
    assert rep["update_period"]["tight_loop_idle"]["median_s"] == pytest.approx(0.1, abs=1e-3)
    assert rep["update_period"]["under_load_batch_resolution"]["median_s"] == pytest.approx(0.1, abs=0.006)


def test_dry_run_alone_costs_match_the_simulated_gpu(dry_report):
    _, rep = dry_report
    sim, kinds = _sim(), _kinds()
    for key, a in rep["alone"].items():
        k = kinds[key]
        assert a["energy_j"] == pytest.approx(sim.energy_j(k), rel=0.01), key
        assert a["time_s"] == pytest.approx(sim.time_s(k), rel=0.01), key
        assert a["dynamic_energy_j"] == pytest.approx(sim.energy_j(k) - 72.0 * sim.time_s(k), rel=0.015), key
        assert a["device_busy_fraction"] == pytest.approx(1.0, abs=0.02), key
    # by hand: Llama-3.1-8B layers (32 x 218.1M) + LM head (525.3M) = 7.505e9 bf16 weights = 15.01 GB;
    # read at 3.7 TB/s in 4.057 ms + 8 us at 455 W
    assert rep["alone"]["shared"]["energy_j"] == pytest.approx(1.8496, rel=0.005)


def test_dry_run_truth_is_the_model_cost_of_the_rows_that_ran(dry_report):
    _, rep = dry_report
    sim, kinds = _sim(), _kinds()
    e_shared = sim.energy_j(kinds["shared"])
    for r in rep["requests"]:
        pre = sum(n * sim.energy_j(kinds[k]) for k, n in r["counts"].items() if k.startswith("prefill"))
        dec = sum(n * sim.energy_j(kinds[k]) for k, n in r["counts"].items() if k.startswith("decode"))
        pre += r["shared_frac"][0] * e_shared
        dec += r["shared_frac"][1] * e_shared
        assert r["truth_prefill_j"] == pytest.approx(pre, rel=0.01), r["request_id"]
        assert r["truth_decode_j"] == pytest.approx(dec, rel=0.01), r["request_id"]
    # The simulated GPU is additive: what the counter shows beyond idle is the sum of the rows' costs.
    assert abs(rep["additivity"]["rel_error"]) <= 0.02


def test_dry_run_drives_the_meter_like_async_vllm(dry_report):
    _, rep = dry_report
    st, kc = rep["engine"]["stats"], rep["engine"]["kind_counts"]
    assert st["steps"] > 500
    assert st["overlapped_starts"] >= st["steps"] - 4  # only the first step of each busy spell is alone
    assert st["mixed_steps"] > 50
    assert st["finished"] == rep["engine"]["requests"] > 30
    assert st["finished_with_step_in_flight"] == st["finished"]  # every finish came with N+1 in flight
    assert st["late_rows"] == st["finished"]
    assert st["aborted"] > 0
    assert any(r["aborted"] and r["tokens_out"] == 0 and r["prompt"] > 512 for r in rep["requests"])
    assert st["idle_reads"] >= 10  # 10 Hz idle ticks read the counter during the idle spells
    assert st["finals"] == st["finished"] and st["duplicate_finals"] == 0
    assert rep["summary"]["all_final"] and rep["summary"]["n_without_final"] == 0
    assert all(kc.get(k, 0) > 0 for k in _kinds() if k.startswith("prefill"))
    assert sum(kc.get(k, 0) > 0 for k in _kinds() if k.startswith("decode")) >= 5
    assert set(kc) <= set(_kinds())


def test_dry_run_meter_error_is_bounded_against_the_independent_truth(dry_report):
    # The simulated prefill draws ~2.5x the power per Roofline second of decode, which the meter's
    # weights do not know: phase errors of tens of percent are expected, request totals much less.
    _, rep = dry_report
    s = rep["summary"]
    assert s["total"]["median_abs"] <= 0.15 and s["total"]["p90_abs"] <= 0.4
    assert s["coverage_1u"] >= 0.6
    assert s["split_only_scale"] == pytest.approx(1.0, abs=0.03)


def test_compare_follows_the_documented_truth_definition():
    from llmco2_serve.runtime.attribution import MeasuredEnergy

    alone = {
        "shared": {"energy_j": 2.0, "time_s": 0.004, "dynamic_energy_j": 1.7},
        "prefill n=256 c=0": {"energy_j": 4.0, "time_s": 0.007, "dynamic_energy_j": 3.5},
        "decode kv=512": {"energy_j": 0.01, "time_s": 2e-5, "dynamic_energy_j": 0.008},
    }
    a = gac.Req("a", 256, 3, None, 0, counts={"prefill n=256 c=0": 1, "decode kv=512": 2},
                shared_frac=[0.5, 0.25])
    b = gac.Req("b", 256, 1, None, 1, counts={"prefill n=256 c=0": 1}, shared_frac=[0.25, 0.0])
    # truth a: prefill 4.0 + 0.5 * 2.0 = 5.0; decode 2 * 0.01 + 0.25 * 2.0 = 0.52; total 5.52
    # truth b: 4.0 + 0.25 * 2.0 = 4.5
    a.final = MeasuredEnergy("a", 5.5, 0.572, 6.072, 0.5, 0.0, "fake", 3, 0, False, True)
    b.final = MeasuredEnergy("b", 4.5, 0.0, 4.5, 0.1, 0.0, "fake", 1, 0, False, True)
    a.first = b.first = a.final
    res = gac.compare([a, b], alone, idle_w=50.0)
    ra, rb = res["requests"]
    assert ra["truth_prefill_j"] == pytest.approx(5.0) and ra["truth_decode_j"] == pytest.approx(0.52)
    assert ra["rel_error"] == pytest.approx(0.10)
    assert ra["rel_error_prefill"] == pytest.approx(0.10) and ra["rel_error_decode"] == pytest.approx(0.10)
    assert not ra["within_uncertainty"] and ra["within_2u"]  # |err| 0.552 J, u 0.5 J
    # dynamic: truth 3.5 + 2 * 0.008 + 0.75 * 1.7 = 4.791; meter 6.072 - 50 W * (0.007 + 4e-5 + 0.003) s
    assert ra["truth_dynamic_j"] == pytest.approx(4.791)
    assert ra["rel_error_dynamic"] == pytest.approx((6.072 - 50.0 * 0.01004) / 4.791 - 1.0)
    assert rb["rel_error"] == pytest.approx(0.0) and rb["within_uncertainty"]
    s = res["summary"]
    assert s["split_only_scale"] == pytest.approx((6.072 + 4.5) / (5.52 + 4.5))
    assert s["coverage_1u"] == pytest.approx(0.5) and s["coverage_2u"] == pytest.approx(1.0)
    assert s["total"]["median_abs"] == pytest.approx(0.05)


def test_workload_kinds_and_buffer_sizes():
    wl = gac.Workload()
    keys = [k.key for k in wl.kinds()]
    assert keys == ["shared", "prefill n=256 c=0", "prefill n=512 c=0", "prefill n=512 c=512",
                    "prefill n=512 c=1024"] + [f"decode kv={L}" for L in range(512, 2305, 256)]
    assert wl.max_kv == 2304  # 1536-token prompt + 640 outputs = 2176 -> 9 blocks of 256
    sh = gac.Shapes.from_config(gac.MODEL_CONFIG)
    assert sh.kv_width == 32 * 2 * 8 * 128  # layers x (K, V) x kv heads x head dim
    assert sh.prefill_reps == 119  # 32 x 218.1M layer params / (4096 x 14336)
    # the meter is told the context the decode row really reads
    d = gac.Kind.decode(768)
    assert (d.phase, d.n_tokens, d.context, d.kv_len) == ("decode", 1, 767, 768)


def test_dry_run_runs_from_a_plain_checkout_without_vllm(tmp_path):
    # As on the GPU machine: the package is not installed (python -S skips the editable finder),
    # so the script must map predictors/ itself; vLLM is never imported.
    purelib = sysconfig.get_paths()["purelib"]
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['gac', '--dry-run', '--out', {str(tmp_path)!r}, '--busy-s', '1', '--idle-spell-s', '0.5',"
        " '--alone-s', '1', '--idle-s', '2', '--period-s', '0.2']\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "import llmco2_serve\n"
        "assert 'vllm' not in sys.modules, 'vllm imported'\n"
        f"assert llmco2_serve.__file__.startswith({str(ROOT)!r}), llmco2_serve.__file__\n"
        "assert 'llmco2_serve.predictors' in sys.modules\n"
    )
    p = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env={"PYTHONPATH": purelib, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["conservation"]["holds"]


def test_a_failure_after_the_engine_phase_keeps_the_raw_results(tmp_path, monkeypatch):
    # One GPU run per lease: a bug in the comparison must not lose what was measured.
    def broken(*a, **k):
        raise ValueError("comparison broke")

    monkeypatch.setattr(gac, "compare", broken)
    with pytest.raises(ValueError, match="comparison broke"):
        gac.main(["--dry-run", "--out", str(tmp_path), "--busy-s", "1", "--idle-spell-s", "0.5",
                  "--alone-s", "1", "--idle-s", "2", "--period-s", "0.2"])
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["complete"] is False and "comparison broke" in data["error"]
    assert set(data["alone_pass_a"]) == set(data["alone_pass_b"]) == set(_kinds())
    assert data["requests_raw"] and all(r["final"] is not None for r in data["requests_raw"])
    assert data["meter_totals"]["total_j"] > 0 and data["idle_start"]["power_w"] > 0
    assert (tmp_path / "report.txt").read_text().startswith("gpu_attribution_check FAILED")


def test_without_cuda_and_without_dry_run_exits_with_a_clear_message(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        gac.main(["--out", str(tmp_path)])
    assert "CUDA is not available" in str(e.value) and "--dry-run" in str(e.value)
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("bad", [["--alone-s", "0.5"], ["--idle-s", "1"], ["--busy-s", "0"]])
def test_bad_arguments_are_refused(tmp_path, bad):
    with pytest.raises(SystemExit) as e:
        gac.main(["--dry-run", "--out", str(tmp_path), *bad])
    assert e.value.code == 2
    assert not (tmp_path / "report.json").exists()


def test_json_has_no_nan():
    assert gac._json_safe({"a": [math.nan, 1.0], "b": math.inf}) == {"a": [None, 1.0], "b": None}
