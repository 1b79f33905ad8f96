import json

import pytest

from llmco2_serve.runtime.settings import (
    ENERGY_READER_MODES, Settings, SettingsError, fail_open_from_env, load_settings, unknown_variables,
)


def test_defaults():
    s = load_settings({"HOME": "/home/u"})
    assert s.enabled and s.fail_open and s.response_headers
    assert s.gpu == "H100" and s.gpu_spec_file is None
    assert (s.intensity_g_per_kwh, s.pue, s.lifetime_years) == (481.0, 1.2, 5.0)
    assert s.energy_reader == "auto" and s.energy_reader_mode == "auto"
    assert s.pairs_path.endswith("/.cache/llmco2/pairs.jsonl") and "~" not in s.pairs_path
    assert s.max_tokens_cap == 131072
    assert s.carbon.intensity_g_per_kwh == 481.0 and s.carbon.pue == 1.2


def test_environment_values_are_parsed():
    s = load_settings({"LLMCO2_ENABLED": "no", "LLMCO2_PUE": "1.5", "LLMCO2_CARBON_INTENSITY_G_PER_KWH": "50",
                       "LLMCO2_ENERGY_READER": "off", "LLMCO2_RESPONSE_HEADERS": "false",
                       "LLMCO2_PAIRS_PATH": "", "LLMCO2_MAX_TOKENS_CAP": "4096", "LLMCO2_GPU": "a100-80gb"})
    assert not s.enabled and not s.response_headers
    assert s.pue == 1.5 and s.intensity_g_per_kwh == 50.0
    assert s.energy_reader == "off" and s.energy_reader_mode == "none"  # gpu_energy's name for off
    assert s.pairs_path is None  # empty disables
    assert s.max_tokens_cap == 4096 and s.gpu == "a100-80gb"
    assert s.describe() == "llmco2 disabled (LLMCO2_ENABLED=0)"


@pytest.mark.parametrize("var,value", [
    ("LLMCO2_PUE", "0.9"), ("LLMCO2_PUE", "abc"), ("LLMCO2_CARBON_INTENSITY_G_PER_KWH", "-1"),
    ("LLMCO2_CARBON_INTENSITY_G_PER_KWH", "nan"), ("LLMCO2_LIFETIME_YEARS", "0"), ("LLMCO2_ENABLED", "maybe"),
    ("LLMCO2_ENERGY_READER", "rapl"), ("LLMCO2_MAX_TOKENS_CAP", "0"), ("LLMCO2_MAX_TOKENS_CAP", "1.5"),
    ("LLMCO2_GPU", "Voodoo5"), ("LLMCO2_GPU", " "), ("LLMCO2_GPU_SPEC_FILE", "/nonexistent/gpu.json"),
])
def test_bad_values_name_the_variable(var, value):
    with pytest.raises(SettingsError) as e:
        load_settings({var: value})
    assert e.value.variable == var
    assert str(e.value).startswith(var + ":")


def test_unknown_gpu_is_not_checked_when_disabled():
    assert not load_settings({"LLMCO2_ENABLED": "0", "LLMCO2_GPU": "Voodoo5"}).enabled


def test_json_config_file_and_env_override(tmp_path):
    path = tmp_path / "llmco2.json"
    path.write_text(json.dumps({"pue": 1.1, "carbon_intensity_g_per_kwh": 30, "gpu": "A100"}))
    s = load_settings({"LLMCO2_CONFIG": str(path), "LLMCO2_PUE": "1.3"})
    assert s.pue == 1.3  # the environment wins over the file
    assert s.intensity_g_per_kwh == 30.0 and s.gpu == "A100" and s.config_file == str(path)
    assert f"config {path}" in s.describe()


def test_toml_config_file_with_table(tmp_path):
    path = tmp_path / "llmco2.toml"
    path.write_text('[llmco2]\nenergy_reader = "nvml"\nresponse_headers = false\nmax_tokens_cap = 100\n')
    s = load_settings({"LLMCO2_CONFIG": str(path)})
    assert s.energy_reader == "nvml" and not s.response_headers and s.max_tokens_cap == 100


def test_config_file_errors_name_file_and_key(tmp_path):
    bad_key = tmp_path / "a.json"
    bad_key.write_text('{"puee": 1.1}')
    with pytest.raises(SettingsError, match="unknown key.*puee") as e:
        load_settings({"LLMCO2_CONFIG": str(bad_key)})
    assert e.value.variable == "LLMCO2_CONFIG"
    bad_value = tmp_path / "b.json"
    bad_value.write_text('{"pue": 0.5}')
    with pytest.raises(SettingsError) as e:
        load_settings({"LLMCO2_CONFIG": str(bad_value)})
    assert e.value.variable == f"{bad_value}:pue"
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"LLMCO2_CONFIG": str(tmp_path / "missing.toml")})
    yaml = tmp_path / "c.yaml"
    yaml.write_text("pue: 1")
    with pytest.raises(SettingsError, match=".json or .toml"):
        load_settings({"LLMCO2_CONFIG": str(yaml)})
    broken = tmp_path / "d.toml"
    broken.write_text("pue = = 1")
    with pytest.raises(SettingsError, match="not valid"):
        load_settings({"LLMCO2_CONFIG": str(broken)})


def test_unknown_variables_and_fail_open():
    assert unknown_variables({"LLMCO2_PUEE": "1", "LLMCO2_PUE": "1", "OTHER": "x"}) == ["LLMCO2_PUEE"]
    assert fail_open_from_env({}) is True
    assert fail_open_from_env({"LLMCO2_FAIL_OPEN": "0"}) is False
    assert fail_open_from_env({"LLMCO2_FAIL_OPEN": "garbage"}) is True


def test_settings_is_frozen_and_covers_every_variable():
    s = load_settings({})
    with pytest.raises(AttributeError):
        s.pue = 2.0  # type: ignore[misc]
    from llmco2_serve.runtime.settings import _PARSERS
    from dataclasses import fields
    assert {f.name for f in fields(Settings)} == set(_PARSERS) | {"config_file"}
    assert ENERGY_READER_MODES == ("auto", "nvml", "cpu-estimate", "fake", "fake-work", "off")  # fake*: test-only


def test_otlp_metrics_endpoint_is_a_base_url():
    from llmco2_serve.runtime.settings import SettingsError, load_settings

    assert load_settings({"LLMCO2_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/"}).otlp_metrics_endpoint == \
        "http://127.0.0.1:4318"
    assert load_settings({}).otlp_metrics_endpoint is None
    with pytest.raises(SettingsError, match="LLMCO2_OTLP_METRICS_ENDPOINT"):
        load_settings({"LLMCO2_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/v1/metrics"})
    with pytest.raises(SettingsError, match="LLMCO2_OTLP_METRICS_ENDPOINT"):
        load_settings({"LLMCO2_OTLP_METRICS_ENDPOINT": "collector:4318"})


@pytest.mark.parametrize("url", ["http://", "http://:4318", "http://collector:port", "http://collector:99999",
                                 "http://collector:0", "https://coll ector:4318", "http://[::1:4318"])
def test_unparseable_otlp_endpoint_names_the_variable(url):
    with pytest.raises(SettingsError, match="LLMCO2_OTLP_METRICS_ENDPOINT: cannot parse"):
        load_settings({"LLMCO2_OTLP_METRICS_ENDPOINT": url})
    assert load_settings({"LLMCO2_OTLP_METRICS_ENDPOINT": "http://[::1]:4318"}).otlp_metrics_endpoint
