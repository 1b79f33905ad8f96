"""One import namespace: the built wheel holds llmco2_serve/{hooks,predictors}, no top-level hooks/predictors."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_one_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("llmco2_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"llmco2_serve"}
    for must in ("llmco2_serve/hooks/__init__.py", "llmco2_serve/predictors/gnn.py",
                 "llmco2_serve/data/gnn_weights_vllm.npz", "llmco2_serve/data/gnn_weights_vllm.json",
                 "llmco2_serve/data/gnn_weights_hf-eager.npz", "llmco2_serve/data/gnn_weights_hf-eager.json",
                 "llmco2_serve/data/mlenergy-v3-vllm.jsonl", "llmco2_serve/data/MLENERGY_V3.md",
                 "llmco2_serve/data/gpus.csv", "llmco2_serve/data/h200-hf-eager.jsonl"):
        assert must in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[vllm.general_plugins]" in text and "llmco2_serve.hooks:" in text
    assert "llmco2 = llmco2_serve.cli:main" in text


def test_core_imports_without_vllm_or_torch():
    code = ("import sys; sys.modules['vllm'] = None; sys.modules['torch'] = None\n"
            "from llmco2_serve.prediction.predictor import Predictor\n"
            "p = Predictor.from_config({'model_type': 'qwen2', 'hidden_size': 896, 'intermediate_size': 4864,"
            " 'num_hidden_layers': 24, 'num_attention_heads': 14, 'num_key_value_heads': 2, 'vocab_size': 151936,"
            " 'torch_dtype': 'bfloat16'}, gpu='L4')\n"
            "print(p.predict(prompt_len=100, gen_tokens=10).energy_j)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0
