"""Tiny random-weight Hugging Face models for tests and local vLLM runs.

No model hub is reachable in CI, so tests build their own models: a complete
HF folder (config, safetensors weights, byte-level BPE tokenizer, chat
template, generation config) small enough that a CPU forward pass takes
milliseconds.  Every supported attention head is 32 wide because vLLM's CPU
attention backend supports head sizes from 32 up.

`torch`, `transformers` and `tokenizers` are imported inside the functions:
the core package must import without them.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
from typing import Any

__all__ = ["FAMILIES", "SUPPORTED_DTYPES", "build_tiny_model", "tiny_config"]

# Shared sizes: hidden 128 = 4 heads x 32, GQA with 2 KV heads, 2 layers.
_HIDDEN_SIZE = 128
_INTERMEDIATE_SIZE = 256
_NUM_LAYERS = 2
_NUM_HEADS = 4
_NUM_KV_HEADS = 2
_HEAD_DIM = 32
_VOCAB_SIZE = 512
_MAX_POSITIONS = 2048

# Special token ids are fixed by their order in the BPE trainer.
_PAD, _BOS, _EOS, _UNK = "<pad>", "<s>", "</s>", "<unk>"
_PAD_ID, _BOS_ID, _EOS_ID = 0, 1, 2
_SPECIAL_TOKENS = [_PAD, _BOS, _EOS, _UNK]
# Byte-level BPE: 256 byte symbols + specials must fit in the vocabulary.
_MIN_VOCAB_SIZE = 256 + len(_SPECIAL_TOKENS)

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_DECODER_COMMON: dict[str, Any] = {
    "hidden_size": _HIDDEN_SIZE,
    "intermediate_size": _INTERMEDIATE_SIZE,
    "num_hidden_layers": _NUM_LAYERS,
    "num_attention_heads": _NUM_HEADS,
    "num_key_value_heads": _NUM_KV_HEADS,
    "head_dim": _HEAD_DIM,
    "vocab_size": _VOCAB_SIZE,
    "max_position_embeddings": _MAX_POSITIONS,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": _BOS_ID,
    "eos_token_id": _EOS_ID,
    "pad_token_id": _PAD_ID,
}

_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_DECODER_COMMON,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        **_DECODER_COMMON,
        "sliding_window": None,
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        **_DECODER_COMMON,
        "sliding_window": None,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **_DECODER_COMMON,
        "use_sliding_window": False,
        "sliding_window": None,
    },
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **_DECODER_COMMON,
        "use_sliding_window": False,
        "sliding_window": None,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "shared_expert_intermediate_size": 256,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": False,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_DECODER_COMMON,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
    },
    "gemma": {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        **_DECODER_COMMON,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    },
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        **_DECODER_COMMON,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": _HEAD_DIM,
        "sliding_window": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
    "bloom": {
        # Bloom spells its sizes n_layer / n_head (head_dim = hidden / n_head)
        # and has no separate MLP width (4 x hidden).
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "hidden_size": _HIDDEN_SIZE,
        "n_layer": _NUM_LAYERS,
        "n_head": _NUM_HEADS,
        "vocab_size": _VOCAB_SIZE,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": True,
        "bos_token_id": _BOS_ID,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _PAD_ID,
    },
    "phi3": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        **{k: v for k, v in _DECODER_COMMON.items() if k != "head_dim"},
        "original_max_position_embeddings": _MAX_POSITIONS,
        "sliding_window": None,
        "rms_norm_eps": 1e-5,
    },
}

FAMILIES: tuple[str, ...] = tuple(_FAMILY_CONFIGS)
SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

# A few hundred distinct words, code and digits so that a 512-token BPE
# learns real merges; fixed text keeps the tokenizer deterministic.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire.",
    "Large language models turn electricity into text; every token has an energy cost.",
    "Carbon intensity of the grid changes by the hour, so the same request can emit more or less CO2.",
    "A graph neural network reads the kernels of each layer and predicts how many joules a request needs.",
    "Prefill processes the whole prompt at once, decode produces one token at a time.",
    "The scheduler batches requests, and the GPU draws power in watts for a number of seconds.",
    "Hello world! How are you today? I am fine, thank you, and you?",
    "Please summarise the following paragraph in three short sentences for a busy reader.",
    "Once upon a time there was a small robot who wanted to learn how to paint the sea.",
    "Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.",
    "The capital of France is Paris, the capital of Japan is Tokyo, and Canberra is in Australia.",
    "Mathematics: 2 + 2 = 4, 3 * 7 = 21, 10 / 4 = 2.5, and 2 ** 10 = 1024.",
    "Dates and numbers: 2024-05-17, 12:45:00, 3.14159, 42, 1000000, 0.001, -17.",
    "def energy_j(power_w, time_s):\n    return power_w * time_s\n",
    "for i in range(10):\n    print(i, i * i)\n",
    "import json\nwith open('config.json') as f:\n    config = json.load(f)\n",
    "class Request:\n    def __init__(self, prompt, max_tokens):\n        self.prompt = prompt\n",
    "SELECT name, energy FROM requests WHERE carbon > 0.5 ORDER BY energy DESC;",
    "<html><body><p>Tiny models make fast tests.</p></body></html>",
    "{\"model\": \"tiny\", \"prompt\": \"Hello\", \"max_tokens\": 16, \"temperature\": 0.0}",
    "Servers, clusters, data centres, cooling, batteries, solar panels, wind turbines and hydro dams.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "Measure twice, cut once. Slow and steady wins the race. Knowledge is power.",
    "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma.",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June.",
    "Red orange yellow green blue indigo violet black white grey brown pink purple gold silver.",
    "Bonjour, comment allez-vous ? Hola, que tal ? Guten Tag, wie geht es Ihnen ? Ciao, come stai ?",
    "The user asked a question and the assistant gave a helpful, honest and harmless answer.",
    "Attention heads compute queries, keys and values; the key value cache grows with context length.",
    "Mixture of experts routes each token to the top two of several feed forward experts.",
)


def tiny_config(family: str, **overrides: Any) -> dict[str, Any]:
    """Return the Hugging Face ``config.json`` dict of a tiny model of ``family``.

    ``overrides`` replace top-level keys (e.g. ``num_hidden_layers=4``).  The
    dict is a fresh deep copy, safe to mutate.  It does not carry a dtype;
    :func:`build_tiny_model` adds ``torch_dtype`` when it writes the folder.
    """
    if family not in _FAMILY_CONFIGS:
        raise ValueError(
            f"family={family!r} is not supported; choose one of {', '.join(FAMILIES)}"
        )
    config = copy.deepcopy(_FAMILY_CONFIGS[family])
    config.update(copy.deepcopy(overrides))
    return config


def build_tiny_model(
    out_dir: str | pathlib.Path,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write a complete random-weight HF model folder and return its path.

    The folder holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json`` (with a chat template), ``special_tokens_map.json``
    and ``generation_config.json``.  The same ``seed``/``family``/``dtype``/
    ``overrides`` give byte-identical files.  Needs torch, transformers and
    tokenizers.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype={dtype!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}"
        )
    config = tiny_config(family, **(overrides or {}))
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} must be an int >= {_MIN_VOCAB_SIZE} "
            "(256 byte symbols + special tokens of the byte-level BPE)"
        )
    config["torch_dtype"] = dtype

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    _write_weights(out, config, seed=seed, dtype=dtype)
    # Our own config.json (not the one save_pretrained wrote) so the folder's
    # config equals tiny_config(...) + torch_dtype, independent of the
    # transformers version that built it.
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": _BOS_ID, "eos_token_id": _EOS_ID, "pad_token_id": _PAD_ID},
    )
    _write_tokenizer(out, vocab_size=min(vocab_size, _VOCAB_SIZE), max_len=_max_len(config))
    return out


def _max_len(config: dict[str, Any]) -> int:
    # Bloom uses ALiBi and has no position limit in its config.
    return int(config.get("max_position_embeddings", _MAX_POSITIONS))


def _write_json(path: pathlib.Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(out: pathlib.Path, config: dict[str, Any], *, seed: int, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_kwargs = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **hf_kwargs)
    # fork_rng: seeding must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model = model.to(getattr(torch, dtype)).eval()
    # save_pretrained (not safetensors.save_file) because it de-duplicates
    # tied embedding/lm_head tensors, which save_file refuses.
    model.save_pretrained(out, safe_serialization=True)


@functools.lru_cache(maxsize=8)
def _train_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{_BOS} $A", pair=f"{_BOS} $A {_BOS} $B", special_tokens=[(_BOS, _BOS_ID)]
    )
    return tokenizer.to_str()


def _write_tokenizer(out: pathlib.Path, *, vocab_size: int, max_len: int) -> None:
    (out / "tokenizer.json").write_text(_train_tokenizer_json(vocab_size), encoding="utf-8")
    specials = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": _PAD, "unk_token": _UNK}
    _write_json(out / "special_tokens_map.json", specials)
    _write_json(
        out / "tokenizer_config.json",
        {
            # Without this, transformers picks the tokenizer class from
            # model_type and GemmaTokenizer rebuilds the pipeline, dropping spaces.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "model_max_length": max_len,
            "chat_template": _CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        },
    )
