"""Start-up checks (llmco2_serve.runtime.preflight) and what the plugin does with them at registration.

NVML is really absent on this machine (pynvml is installed, the driver library is not), so the
``nvml`` cases use the real failure; the positive case uses gpu_energy.FakeNvml (no GPU here).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import pytest

from llmco2_serve.runtime import preflight
from llmco2_serve.hardware.gpu_energy import EnergyReaderError, FakeNvml, NvmlEnergyReader
from llmco2_serve.runtime.settings import load_settings


def _nvml_missing() -> bool:
    try:
        NvmlEnergyReader([0]).close()
    except EnergyReaderError:
        return True
    return False


needs_no_nvml = pytest.mark.skipif(not _nvml_missing(), reason="NVML works on this host")


def _env(**kw) -> dict[str, str]:
    env = {"HOME": "/nonexistent-home", "LLMCO2_PAIRS_PATH": ""}
    env.update({f"LLMCO2_{k.upper()}": v for k, v in kw.items()})
    return env


@needs_no_nvml
def test_explicit_nvml_without_nvml_is_a_problem_that_turns_measurement_off():
    settings, problems = preflight.preflight(_env(energy_reader="nvml"))
    assert [p.setting for p in problems] == ["LLMCO2_ENERGY_READER"]
    assert "NVML" in problems[0].reason and "not found" in problems[0].reason.lower()
    assert problems[0].disabled == preflight.MEASUREMENT_OFF
    eff = preflight.effective_settings(settings, problems)
    assert eff.energy_reader == "off" and eff.energy_reader_mode == "none"
    assert (eff.pue, eff.gpu, eff.fail_open) == (settings.pue, settings.gpu, settings.fail_open)


@needs_no_nvml
def test_auto_reader_without_nvml_is_not_a_problem():
    assert preflight.preflight(_env(energy_reader="auto"))[1] == []
    assert preflight.preflight(_env(energy_reader="off"))[1] == []


def test_nvml_with_a_working_counter_is_fine():
    fake = FakeNvml([300.0], clock=time.monotonic, names=["NVIDIA H100 80GB HBM3"])
    assert preflight.preflight(_env(energy_reader="nvml"), nvml=fake)[1] == []
    unsupported = FakeNvml([300.0], clock=time.monotonic, supports_energy=[False])
    (p,) = preflight.preflight(_env(energy_reader="nvml"), nvml=unsupported)[1]
    assert p.setting == "LLMCO2_ENERGY_READER"


def test_cpu_estimate_without_codecarbon(monkeypatch):
    pytest.importorskip("codecarbon")
    assert preflight.preflight(_env(energy_reader="cpu-estimate"))[1] == []
    for name in [m for m in sys.modules if m == "codecarbon" or m.startswith("codecarbon.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # what Python does for an absent package
    (p,) = preflight.preflight(_env(energy_reader="cpu-estimate"))[1]
    assert p.setting == "LLMCO2_ENERGY_READER" and "codecarbon" in p.reason
    assert p.disabled == preflight.MEASUREMENT_OFF


def test_unwritable_pairs_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (p,) = preflight.preflight(_env(pairs_path=str(blocker / "pairs.jsonl")))[1]
    assert p.setting == "LLMCO2_PAIRS_PATH" and str(blocker) in p.reason and p.disabled == preflight.PAIRS_OFF
    settings = load_settings(_env(pairs_path=str(blocker / "pairs.jsonl")))
    assert preflight.effective_settings(settings, [p]).pairs_path is None
    (d,) = preflight.preflight(_env(pairs_path=str(tmp_path)))[1]
    assert "directory" in d.reason
    deep = tmp_path / "file" / "a" / "b" / "pairs.jsonl"
    (q,) = preflight.preflight(_env(pairs_path=str(deep)))[1]
    assert q.setting == "LLMCO2_PAIRS_PATH"


def test_writable_pairs_paths_are_fine_and_nothing_is_created(tmp_path):
    new = tmp_path / "a" / "b" / "pairs.jsonl"
    assert preflight.preflight(_env(pairs_path=str(new)))[1] == []
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "p.jsonl"
    existing.write_text('{"x": 1}\n')
    assert preflight.preflight(_env(pairs_path=str(existing)))[1] == []
    assert existing.read_text() == '{"x": 1}\n'


@pytest.mark.parametrize("kw,variable", [
    ({"gpu": "Voodoo5"}, "LLMCO2_GPU"),
    ({"gpu_spec_file": "/nonexistent/gpu.json"}, "LLMCO2_GPU_SPEC_FILE"),
    ({"otlp_metrics_endpoint": "http://collector:port"}, "LLMCO2_OTLP_METRICS_ENDPOINT"),
    ({"pue": "0.5"}, "LLMCO2_PUE"),
])
def test_invalid_settings_turn_the_plugin_off(kw, variable):
    settings, problems = preflight.preflight(_env(**kw))
    assert settings is None and len(problems) == 1
    assert problems[0].setting == variable and problems[0].disabled == preflight.PLUGIN_OFF


def test_unreadable_gpu_spec_file(tmp_path):
    spec = tmp_path / "gpu.json"
    spec.write_text("{broken")
    _, (p,) = preflight.preflight(_env(gpu_spec_file=str(spec)))
    assert p.setting == "LLMCO2_GPU_SPEC_FILE" and p.disabled == preflight.PLUGIN_OFF


@needs_no_nvml
def test_every_problem_is_reported_together(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _, problems = preflight.preflight(_env(energy_reader="nvml", pairs_path=str(blocker / "p.jsonl")))
    err = preflight.PreflightError(problems)
    assert str(err).startswith("LLMCO2_ENERGY_READER: ") and "; LLMCO2_PAIRS_PATH: " in str(err)


def test_disabled_plugin_checks_nothing():
    assert preflight.preflight(_env(enabled="0", energy_reader="nvml", pairs_path="/dev/null/x"))[1] == []


# --- at registration (needs the installed vLLM) ----------------------------------------------


@pytest.fixture
def hooks_env(monkeypatch):
    pytest.importorskip("vllm")
    from llmco2_serve.hooks import _patches, _state

    for k in [k for k in os.environ if k.startswith("LLMCO2_") or k.startswith("_LLMCO2_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("LLMCO2_PAIRS_PATH", "")
    _patches.unapply_all()
    _patches.failures.clear()
    _patches._logged.clear()
    _state._STATE = None
    yield monkeypatch
    _patches.unapply_all()
    _state._STATE = None
    os.environ.pop("_LLMCO2_PREFLIGHT_REPORTED_BY", None)


@pytest.mark.vllm
@needs_no_nvml
def test_fail_closed_registration_refuses_before_patching(hooks_env, caplog):
    from llmco2_serve import hooks
    from llmco2_serve.hooks import _patches

    hooks_env.setenv("LLMCO2_FAIL_OPEN", "0")
    hooks_env.setenv("LLMCO2_ENERGY_READER", "nvml")
    with caplog.at_level(logging.ERROR, logger="vllm.llmco2"):
        with pytest.raises(preflight.PreflightError, match="LLMCO2_ENERGY_READER"):
            hooks.register_general_plugin()
    assert _patches.applied() == []
    assert "llmco2: refusing to start (LLMCO2_FAIL_OPEN=0): LLMCO2_ENERGY_READER: 'nvml'" in caplog.text


@pytest.mark.vllm
@needs_no_nvml
def test_fail_open_registration_logs_once_and_turns_off_only_that(hooks_env, caplog, tmp_path):
    from llmco2_serve import hooks
    from llmco2_serve.hooks import _patches, _state

    blocker = tmp_path / "file"
    blocker.write_text("x")
    hooks_env.setenv("LLMCO2_ENERGY_READER", "nvml")
    hooks_env.setenv("LLMCO2_PAIRS_PATH", str(blocker / "pairs.jsonl"))
    with caplog.at_level(logging.DEBUG, logger="vllm.llmco2"):
        hooks.register_general_plugin()
        hooks.register_general_plugin()  # idempotent: nothing new
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "vllm.llmco2"]
    assert len(warnings) == 2
    assert any("LLMCO2_ENERGY_READER" in w and "measured energy is OFF" in w for w in warnings)
    assert any("LLMCO2_PAIRS_PATH" in w and "pairs for retraining are NOT kept" in w for w in warnings)
    st = _state.state()
    assert st.active and _patches.applied()  # the plugin itself runs
    assert st.settings.energy_reader == "off" and st.settings.pairs_path is None

    # a process vLLM starts from this one (engine core, spawned) checks again but does not repeat it
    caplog.clear()
    _patches._logged.clear()
    _patches.unapply_all()
    _state._STATE = None
    hooks_env.setenv("_LLMCO2_PREFLIGHT_REPORTED_BY", str(os.getpid() + 1))
    with caplog.at_level(logging.DEBUG, logger="vllm.llmco2"):
        hooks.register_general_plugin()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "vllm.llmco2"]
    assert _state.state().settings.energy_reader == "off"


@pytest.mark.vllm
def test_stat_logger_reports_predictions_once_and_only_when_they_change(hooks_env, caplog):
    from types import SimpleNamespace

    from llmco2_serve import hooks
    from llmco2_serve.hooks.stat_logger import LLMCO2StatLogger
    from llmco2_serve.devtools.tinymodel import tiny_config

    hooks.register_general_plugin()
    cfg = {**tiny_config("llama"), "torch_dtype": "float32"}
    vc = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: cfg), hf_text_config=None,
                                     dtype="torch.float32", served_model_name="tiny", model="/m",
                                     quantization=None, max_model_len=256, architectures=["LlamaForCausalLM"]),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="auto"), scheduler_config=SimpleNamespace(max_num_seqs=4))
    stat = LLMCO2StatLogger(vc, 0)
    svc = stat.service
    assert svc is not None

    def lines():  # the prediction part (a calibration summary follows after "; ")
        return [r.getMessage().split("; calibration")[0] for r in caplog.records
                if "predictions, mean" in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="vllm.llmco2"):
        stat.log()
        assert lines() == []  # nothing predicted yet
        # what EnergyService.on_request accumulates per prediction
        svc.prediction_count, svc.prediction_time_s, svc.prediction_time_max_s = 3, 0.003, 0.002
        for _ in range(5):  # vLLM's ~10 s ticks while idle
            stat.log()
        assert lines() == ["llmco2: 3 predictions, mean 1.000 ms, max 2.000 ms"]
        svc.prediction_count, svc.prediction_time_s = 4, 0.0034
        # vLLM's logger for a second data-parallel engine: same service, the line is said once
        engine_1 = LLMCO2StatLogger(vc, 1)
        assert engine_1.service is svc
        engine_1.log()
        stat.log()
        stat.log()
        engine_1.log()
    assert lines()[1:] == ["llmco2: 4 predictions, mean 0.850 ms, max 2.000 ms"]
