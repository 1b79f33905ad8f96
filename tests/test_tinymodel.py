"""Tiny random-weight model builder: every family builds, loads and runs."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest

from llmco2_serve.devtools.tinymodel import FAMILIES, build_tiny_model, tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

# Text with spaces, punctuation, digits and non-ASCII: a tokenizer that drops
# spaces (GemmaTokenizer rebuilt from model_type) or unknown bytes fails here.
_TEXT = "Hello world, energy 42 J & CO2 (°C)!"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(root / family, family) for family in FAMILIES}


def _file_digests(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_tokenizes_and_runs_forward(built, family):
    folder = built[family]
    assert {p.name for p in folder.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    on_disk = json.loads((folder / "config.json").read_text())
    assert on_disk == {**tiny_config(family), "torch_dtype": "float32"}

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(_TEXT)["input_ids"]
    assert ids[0] == 1  # <s> prepended by the post-processor
    assert len(ids) > 2
    assert max(ids) < on_disk["vocab_size"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == _TEXT

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == on_disk["architectures"][0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert tuple(logits.shape) == (1, len(ids), on_disk["vocab_size"])
    assert torch.isfinite(logits).all()


def test_head_dim_fits_vllm_cpu_attention():
    # vLLM's CPU attention supports head sizes 32, 64, 80, ...
    for family in FAMILIES:
        cfg = tiny_config(family)
        heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
        assert head_dim == 32, family
        assert heads * head_dim == cfg["hidden_size"], family


def test_moe_families_have_four_experts_top_two():
    assert tiny_config("mixtral")["num_local_experts"] == 4
    assert tiny_config("mixtral")["num_experts_per_tok"] == 2
    assert tiny_config("qwen2_moe")["num_experts"] == 4
    assert tiny_config("qwen2_moe")["num_experts_per_tok"] == 2


def test_tiny_config_overrides_and_returns_fresh_copy():
    cfg = tiny_config("llama", num_hidden_layers=4, hidden_size=256)
    assert cfg["num_hidden_layers"] == 4
    assert cfg["hidden_size"] == 256
    cfg["vocab_size"] = 7
    assert tiny_config("llama")["vocab_size"] == 512
    assert tiny_config("llama")["num_hidden_layers"] == 2


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tmp_path):
    a = _file_digests(build_tiny_model(tmp_path / "a", "llama", seed=7))
    b = _file_digests(build_tiny_model(tmp_path / "b", "llama", seed=7))
    c = _file_digests(build_tiny_model(tmp_path / "c", "llama", seed=8))
    assert a == b
    assert c["model.safetensors"] != a["model.safetensors"]
    assert c["tokenizer.json"] == a["tokenizer.json"]


def test_seeding_leaves_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", "llama", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_dtype_and_overrides_reach_the_saved_model(tmp_path):
    folder = build_tiny_model(
        tmp_path / "m", "qwen2", dtype="bfloat16", overrides={"num_hidden_layers": 3}
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert len(model.model.layers) == 3


def test_chat_template_renders_roles_and_generation_prompt(built):
    tokenizer = transformers.AutoTokenizer.from_pretrained(built["llama"])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="family='gpt9'"):
        tiny_config("gpt9")
    with pytest.raises(ValueError, match="dtype='int8'"):
        build_tiny_model(tmp_path / "x", "llama", dtype="int8")
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tiny_model(tmp_path / "y", "llama", overrides={"vocab_size": 100})
