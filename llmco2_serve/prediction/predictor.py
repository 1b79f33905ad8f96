"""The one entry point: ``Predictor.from_config(...)`` then ``predict(...)``.

Everything that depends only on (model, GPU, precision, parallelism) — the layer graph template,
its coefficient matrices, the GNN's adjacency, the carbon factors — is built once in
``from_config``. ``predict`` then costs a few NumPy operations (see ``benchmarks/predict_overhead.py``)
and ``predict_many`` evaluates thousands of requests in one pass.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import numpy as np

from llmco2_serve.workload.arch import ModelArch, load_hf_config
from llmco2_serve.carbon.footprint import CarbonSettings, embodied_co2_g, operational_co2_g
from llmco2_serve.workload.graph import Parallelism, Segment, build_layer_template
from llmco2_serve.hardware.gpus import GPUSpec, resolve_gpu
from llmco2_serve.workload.precision import Precision
from llmco2_serve.predictors.features import GLOBAL_FEATURE_NAMES, NODE_FEATURE_NAMES, Standardizer, featurize
from llmco2_serve.predictors.gnn_numpy import NumpyGNN, mean_adjacency

log = logging.getLogger(__name__)

# Engine profiles: one packaged weights file (+ ``.json`` metadata) per way of running the model,
# each trained on the packaged records of that engine (``llmco2 train --profile NAME``).
# ``families``: the model families (records' ``family``, else model label) its weights are trained
# on, pinned so that the weights reproduce while the parser gains families; None: every record.
PROFILES: dict[str, dict] = {
    "vllm": {"weights": "gnn_weights_vllm.npz", "data": "mlenergy-v3-vllm.jsonl",
             "families": ("qwen3", "qwen3_moe", "gpt_oss", "gemma3", "llama4", "deepseek_v3"),
             "about": "vLLM continuous batching, CUDA graphs (ML.ENERGY Benchmark v3, H100/B200, TP/EP up to 8)"},
    "hf-eager": {"weights": "gnn_weights_hf-eager.npz", "data": "h200-hf-eager.jsonl", "families": None,
                 "about": "Hugging Face transformers, eager, bf16, one request at a time (175 H200 requests)"},
}
DEFAULT_PROFILE = "vllm"
WEIGHTS_FILE = PROFILES[DEFAULT_PROFILE]["weights"]
METADATA_FILE = os.path.splitext(WEIGHTS_FILE)[0] + ".json"


class WeightsError(RuntimeError):
    pass


def profile_info(profile: str) -> dict:
    """The :data:`PROFILES` entry of ``profile``; WeightsError naming the known ones otherwise."""
    if profile not in PROFILES:
        raise WeightsError(f"unknown engine profile {profile!r}; known: {', '.join(PROFILES)}")
    return PROFILES[profile]


@dataclass(frozen=True)
class EmbeddedWeights:
    arrays: dict
    metadata: dict

    @property
    def label(self) -> str:
        m = self.metadata
        profile = f" {m['profile']}" if m.get("profile") else ""
        return f"llmco2-gnn {m.get('version', '?')}{profile} ({m.get('engine_profile', '?')})"


@functools.lru_cache(maxsize=8)
def load_weights(path: str | None = None, profile: str | None = None) -> EmbeddedWeights:
    """GNN weights: a user file written by ``llmco2 train`` (``path``), else the packaged weights of
    engine ``profile`` (default :data:`DEFAULT_PROFILE`); loaded once. Not both."""
    if path is not None and profile is not None:
        raise WeightsError("give a weights file or an engine profile, not both")
    try:
        if path is None:
            name = profile_info(profile or DEFAULT_PROFILE)["weights"]
            base = resources.files("llmco2_serve.data")
            with resources.as_file(base / name) as p, open(p, "rb") as f:
                arrays = dict(np.load(f))
            metadata = json.loads((base / (os.path.splitext(name)[0] + ".json")).read_text(encoding="utf-8"))
        else:
            with open(path, "rb") as f:
                arrays = dict(np.load(f))
            meta_path = os.path.splitext(path)[0] + ".json"
            with open(meta_path, encoding="utf-8") as f:
                metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot load GNN weights from {path or f'profile {profile or DEFAULT_PROFILE!r}'}: {e}") from e
    return EmbeddedWeights(arrays, metadata)


class WeightsBeingReplaced(WeightsError):
    """The npz does not have the ``weights_sha256`` its ``.json`` names: caught between a
    publication's two ``os.replace`` calls; try again later."""


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or replaced (os.replace gives a new inode); None when
    it cannot be stat'ed. The hot-reload watchers compare it between looks."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_weights_file(path: str) -> EmbeddedWeights:
    """A weights file and its ``.json`` as they are now, for a hot reload (not cached, unlike
    :func:`load_weights`): the bytes checked against the metadata's ``weights_sha256`` are the bytes
    loaded. Raises :class:`WeightsBeingReplaced` on a mismatch, :class:`WeightsError` otherwise."""
    import hashlib
    import io

    try:
        with open(path, "rb") as f:
            data = f.read()
        with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
            metadata = json.load(f)
        if not isinstance(metadata, dict):
            raise WeightsError("metadata is not a JSON object")
        want = metadata.get("weights_sha256")
        if want and hashlib.sha256(data).hexdigest() != want:
            raise WeightsBeingReplaced("weights and metadata do not match (being replaced?); retrying later")
        arrays = dict(np.load(io.BytesIO(data)))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read GNN weights from {path}: {e}") from e
    return EmbeddedWeights(arrays, metadata)


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one request (``batch`` sequences). Energies in J, carbon in g CO2e."""

    prefill_energy_j: float
    decode_energy_j: float
    energy_j: float
    prefill_time_s: float
    decode_time_s: float
    time_s: float
    operational_co2_g: float
    embodied_co2_g: float
    co2_g: float
    totals: dict
    inputs: dict
    predictor: str

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "prefill_energy_j", "decode_energy_j", "energy_j", "prefill_time_s", "decode_time_s", "time_s",
            "operational_co2_g", "embodied_co2_g", "co2_g")}
        d.update(self.totals)
        d["inputs"] = dict(self.inputs)
        d["predictor"] = self.predictor
        return d


@dataclass(frozen=True)
class PredictionBatch:
    """Arrays of shape (R,) for R requests."""

    prefill_energy_j: np.ndarray
    decode_energy_j: np.ndarray
    energy_j: np.ndarray
    time_s: np.ndarray
    co2_g: np.ndarray


@dataclass
class Predictor:
    arch: ModelArch
    gpu: GPUSpec
    precision: Precision
    parallelism: Parallelism
    carbon: CarbonSettings
    attention: str = "fused"
    weights: EmbeddedWeights = field(default_factory=load_weights, repr=False)
    model_name: str = ""

    def __post_init__(self):
        meta = self.weights.metadata
        if list(meta.get("node_features", [])) != list(NODE_FEATURE_NAMES) or \
                list(meta.get("global_features", [])) != list(GLOBAL_FEATURE_NAMES):
            raise WeightsError("GNN weights were trained on a different feature layout; retrain with `llmco2 train`")
        self._template = build_layer_template(self.arch, self.precision, self.gpu, self.parallelism, self.attention)
        self._adjacency = mean_adjacency(self._template.edge_index, self._template.n_nodes)
        self._net = NumpyGNN(self.weights.arrays)
        self._std = Standardizer.from_arrays(self.weights.arrays)
        self._layer_scaled = bool(meta.get("layer_scaled", False))
        self._power_fraction = float(meta.get("mean_power_fraction_of_tdp", 0.35))
        self._co2_per_j = operational_co2_g(1.0, self.carbon.pue, self.carbon.intensity_g_per_kwh)
        self._embodied_per_s = embodied_co2_g(1.0, self.parallelism.n_gpu, self.gpu.embodied_co2_kg,
                                              self.carbon.lifetime_s)

    @classmethod
    def from_config(cls, model_config: Mapping[str, Any] | str | os.PathLike, *, gpu: str | GPUSpec = "H100",
                    n_gpu: int | None = None, tensor_parallel: int | None = None, pipeline_parallel: int = 1,
                    dtype: str | None = None, kv_cache_dtype: str | None = None,
                    carbon: CarbonSettings | None = None, gpu_spec_file: str | None = None,
                    weights_path: str | None = None, attention: str = "fused",
                    profile: str | None = None) -> "Predictor":
        """Build from an HF config (dict, file or model folder), a GPU name (NVML names work) and TP/PP.

        ``n_gpu`` is a shorthand for ``tensor_parallel`` when PP is 1. ``profile`` names the packaged
        engine profile's weights (:data:`PROFILES`, default ``vllm``); ``weights_path`` a user file instead.
        """
        config = dict(model_config) if isinstance(model_config, Mapping) else load_hf_config(model_config)
        arch = ModelArch.from_hf_config(config)
        precision = Precision.from_hf_config(config, override=dtype, kv_cache_dtype=kv_cache_dtype)
        spec = gpu if isinstance(gpu, GPUSpec) else resolve_gpu(gpu, gpu_spec_file)
        tp = tensor_parallel or (n_gpu // pipeline_parallel if n_gpu else 1)
        if n_gpu and tp * pipeline_parallel != n_gpu:
            raise ValueError(f"n_gpu={n_gpu} is not tensor_parallel x pipeline_parallel ({tp} x {pipeline_parallel})")
        return cls(arch=arch, gpu=spec, precision=precision,
                   parallelism=Parallelism(tp, pipeline_parallel), carbon=carbon or CarbonSettings(),
                   attention=attention, weights=load_weights(weights_path, profile),
                   model_name=str(config.get("_name_or_path") or config.get("model_type")))

    # -- hot path ---------------------------------------------------------------------------------

    def _raw(self, batch, prompt_len, gen_tokens):
        gb = featurize(self._template, batch, prompt_len, gen_tokens, self.gpu)
        out = self._net.forward(self._std.nodes(gb.node_x), self._adjacency, self._std.globals(gb.global_x))
        scale = float(self.arch.num_layers) if self._layer_scaled else 1.0
        pre = np.exp(out[:, 0]) * scale
        dec = np.exp(out[:, 1]) * gb.decode_steps * scale
        return pre, dec, gb.totals

    def _time_s(self, energy_j, roofline_time_s):
        # Time at the training set's mean power; never faster than the Roofline allows.
        power_w = self._power_fraction * self.gpu.tdp_w * self.parallelism.n_gpu
        return np.maximum(energy_j / power_w, roofline_time_s)

    def predict(self, *, prompt_len: int, gen_tokens: int, batch: int = 1) -> Prediction:
        _validate(batch, prompt_len, gen_tokens)
        pre, dec, t = self._raw(batch, prompt_len, gen_tokens)
        pre_e, dec_e = float(pre[0]), float(dec[0])
        pre_t = float(self._time_s(pre, t.prefill_time_s)[0])
        dec_t = float(self._time_s(dec, t.decode_time_s)[0]) if gen_tokens > 1 else 0.0
        energy = pre_e + dec_e
        oper = energy * self._co2_per_j
        emb = (pre_t + dec_t) * self._embodied_per_s
        totals = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in (
            ("prefill_flops", t.prefill_flops), ("decode_flops", t.decode_flops),
            ("prefill_bytes", t.prefill_bytes), ("decode_bytes", t.decode_bytes),
            ("network_bytes", t.network_bytes))}
        inputs = {"model_type": self.arch.model_type, "model": self.model_name, "gpu": self.gpu.name,
                  "n_gpu": self.parallelism.n_gpu, "tensor_parallel": self.parallelism.tensor_parallel,
                  "pipeline_parallel": self.parallelism.pipeline_parallel, "dtype": self.precision.label,
                  "kv_cache_dtype": self.precision.kv_dtype, "batch": batch, "prompt_len": prompt_len,
                  "gen_tokens": gen_tokens, "carbon_intensity_g_per_kwh": self.carbon.intensity_g_per_kwh,
                  "pue": self.carbon.pue}
        return Prediction(pre_e, dec_e, energy, pre_t, dec_t, pre_t + dec_t, oper, emb, oper + emb, totals, inputs,
                          self.weights.label)

    def predict_many(self, prompt_len, gen_tokens, batch=1) -> PredictionBatch:
        """Vectorised predictions for arrays of requests (no per-request Python)."""
        pre, dec, t = self._raw(batch, prompt_len, gen_tokens)
        time_s = self._time_s(pre, t.prefill_time_s) + np.where(dec > 0, self._time_s(dec, t.decode_time_s), 0.0)
        energy = pre + dec
        return PredictionBatch(pre, dec, energy, time_s, energy * self._co2_per_j + time_s * self._embodied_per_s)

    def predict_phases(self, prompt_len, gen_tokens, batch=1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per phase, for arrays of requests (``batch`` may be an array too): prefill energy (J),
        decode energy (J), prefill time (s), decode time (s) of the whole batch.

        The parts :meth:`predict_many` sums (its ``time_s`` is prefill + decode time, its CO2 is
        ``energy * co2_per_j + time * embodied_per_s``); :mod:`llmco2_serve.prediction.fast_predict`
        tabulates them once so that the server's per-request prediction is a lookup.
        """
        pre, dec, t = self._raw(batch, prompt_len, gen_tokens)
        pre_t = self._time_s(pre, t.prefill_time_s)
        dec_t = np.where(dec > 0, self._time_s(dec, t.decode_time_s), 0.0)
        return pre, dec, pre_t, dec_t

    @property
    def co2_g_per_j(self) -> float:
        """Operational carbon per joule (g/J) at the predictor's PUE and intensity."""
        return self._co2_per_j

    @property
    def embodied_co2_g_per_s(self) -> float:
        """Embodied carbon per second of the deployment's GPUs (g/s)."""
        return self._embodied_per_s

    def step_costs(self, new_tokens, context_len) -> np.ndarray:
        """Relative cost (Roofline time, s) of engine-step work items: ``new_tokens`` after ``context_len``.

        Used to split a measured step's energy between the requests scheduled in it.
        """
        seg = Segment.chunk(1, new_tokens, context_len)
        c = self._template.costs(seg)
        layers = self.arch.num_layers
        return c.time_s.sum(-1) * layers + self._template.head_costs(seg)[2]


def _validate(batch, prompt_len, gen_tokens):
    for name, v in (("batch", batch), ("prompt_len", prompt_len), ("gen_tokens", gen_tokens)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
