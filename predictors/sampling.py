"""Focused energy data sampling (LLMCO2 section 4.2, Algorithm 1).

Instead of sampling the space of architectures x inference configs x GPUs uniformly, start from
priors (published model configs, a public request trace, a list of GPUs), train the predictor,
and repeatedly sample more data around the test points it predicts worst, until its error on the
growing test set TD is below a threshold.

Energies come from a pluggable :class:`MeasurementOracle`. A real oracle runs each point on a GPU.
:class:`AnalyticSimulatorOracle` is a SIMULATOR for developing and testing the loop without one: its
records say ``engine="analytic-simulator"`` and ``source="simulated, not measured"`` and must never
be used as training data for shipped weights.

Choices the paper leaves open:
* error e(f): mean relative error |E_hat / E - 1| of request energy over TD (a fraction, not %);
* "data points with large error" (line 17): the ``focus`` test points with the largest relative
  error among those above the threshold (there is at least one while the mean is above it);
* "update f" (line 20): retrain from scratch on the grown training set (deterministic per seed);
* fine-grained sampling varies prompt_len, gen_tokens, batch and the layer count by integer offsets
  drawn uniformly from [-C, C], clipped to >= 1; GPU, dtype and the other arch fields stay the parent's.
  A variant keeps its parent's ``model`` name (the arch dict carries the changed layer count).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from llmco2_serve.workload.arch import ModelArch
from llmco2_serve.workload.graph import Parallelism, Segment, build_layer_template
from llmco2_serve.hardware.gpus import gpu_spec
from llmco2_serve.workload.precision import Precision
from llmco2_serve.prediction.records import parse_record

__all__ = [
    "DEFAULT_GPUS",
    "DEFAULT_RANGES",
    "AnalyticSimulatorOracle",
    "MeasurementOracle",
    "SamplePoint",
    "SamplingRound",
    "fine_grained_sample",
    "focused_sampling",
    "gnn_train_predict",
    "inference_prior",
    "prior_architectures",
    "relative_errors",
    "sample_from_priors",
    "select_focus",
    "simulated_phase_energy_j",
    "split_train_test",
]

SIMULATOR_ENGINE = "analytic-simulator"
SIMULATOR_SOURCE = "simulated, not measured"
TRACE_FILE = "azure_trace_slice.csv"
# Paper Table 2 uses T4, L4, A100, H100; T4 has no bf16, so it is replaced by the H200 we measured on.
DEFAULT_GPUS = ("L4", "A100-SXM-80GB", "H100-SXM-80GB", "H200-SXM-141GB")
# Paper 4.2: C = 10 for prompt length, 1 for generated tokens, 1 for the layer count.
DEFAULT_RANGES = MappingProxyType({"prompt_len": 10, "gen_tokens": 1, "layers": 1})
RANGE_DIMENSIONS = ("prompt_len", "gen_tokens", "batch", "layers")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # the names ModelArch accepts
HEAD_KERNELS_PER_PASS = 3  # embedding gather, final norm, LM head
WEIGHT_MEMORY_FRACTION = 0.9  # weights must leave room for activations and the KV cache

# Key config fields of published models, as in data/h200-hf-eager.jsonl (n_params dropped: it
# changes when fine-grained sampling changes the layer count).
_PRIOR_ARCHS: dict[str, dict[str, Any]] = {
    "llama3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "vocab_size": 128256, "rope_theta": 500000.0, "attn_impl": "sdpa"},
    "qwen2-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "attn_impl": "sdpa"},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "vocab_size": 32000, "attn_impl": "sdpa"},
    "gemma2-2b": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
                  "sliding_window": 4096, "attn_impl": "sdpa"},
    "bloom-1b7": {"model_type": "bloom", "hidden_size": 2048, "n_layer": 24, "n_head": 16, "vocab_size": 250880,
                  "attn_impl": "eager"},
    "llama3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                    "tie_word_embeddings": True, "rope_theta": 500000.0, "attn_impl": "sdpa"},
    "qwen2-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                   "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "attn_impl": "sdpa"},
    "mixtral-8x7b-8layer": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                            "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8,
                            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
                            "attn_impl": "sdpa"},
}


def _layer_key(arch: Mapping[str, Any]) -> str:
    for k in _LAYER_KEYS:
        if k in arch:
            return k
    raise ValueError(f"arch has no layer-count field (one of {', '.join(_LAYER_KEYS)})")


@dataclass(frozen=True)
class SamplePoint:
    """One point of A x I x H: an HF-style arch dict, the GPU setup and the request shape."""

    model: str
    arch: Mapping[str, Any]
    gpu: str
    n_gpu: int
    dtype: str
    batch: int
    prompt_len: int
    gen_tokens: int

    def __post_init__(self):
        for name in ("n_gpu", "batch", "prompt_len", "gen_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"SamplePoint field {name!r} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not isinstance(self.arch, Mapping) or not self.arch.get("model_type"):
            raise ValueError("SamplePoint field 'arch' must be a mapping of HF config fields with 'model_type'")
        object.__setattr__(self, "arch", MappingProxyType(dict(self.arch)))  # read-only copy

    @property
    def layers(self) -> int:
        return int(self.arch[_layer_key(self.arch)])

    @property
    def attention(self) -> str:
        """As :attr:`llmco2_serve.prediction.records.EnergyRecord.attention`: HF 'eager' is unfused."""
        return "unfused" if self.arch.get("attn_impl") == "eager" else "fused"

    def arch_dict(self) -> dict[str, Any]:
        return dict(self.arch)

    def template(self):
        """The layer template of this point (cached by ``build_layer_template``) and its GPU spec."""
        gpu = gpu_spec(self.gpu)
        t = build_layer_template(ModelArch.from_hf_config(self.arch_dict()), Precision.from_name(self.dtype), gpu,
                                 Parallelism(tensor_parallel=self.n_gpu), attention=self.attention)
        return t, gpu


class MeasurementOracle(Protocol):
    """Measures points; returns one energy record (``llmco2_serve.prediction.records`` format) per point, in order."""

    def measure(self, points: list[SamplePoint]) -> list[dict]: ...


def simulated_phase_energy_j(roofline_time_s: float, launches: float, launch_overhead_s: float,
                             idle_power_w: float, tdp_w: float, n_gpu: int) -> tuple[float, float]:
    """Simulator power model for one phase (not a paper equation): ``(energy_j, time_s)``.

    time_s = t_roofline + launches * launch_overhead_s (launch gaps do not overlap kernels);
    utilisation u = t_roofline / time_s; power_w = idle_power_w + u * (tdp_w - idle_power_w) per GPU;
    energy_j = n_gpu * power_w * time_s.
    """
    time_s = roofline_time_s + launches * launch_overhead_s
    if time_s <= 0:
        return 0.0, 0.0
    utilisation = roofline_time_s / time_s
    power_w = idle_power_w + utilisation * (tdp_w - idle_power_w)
    return n_gpu * power_w * time_s, time_s


class AnalyticSimulatorOracle:
    """SIMULATED energies (not measurements): kernel-graph Roofline times x a simple power model.

    Per phase: :func:`simulated_phase_energy_j` with ``idle_power_w = idle_fraction x TDP`` and one
    kernel launch per graph node per layer per forward pass (plus the LM head's), times an independent
    lognormal factor exp(N(0, noise_sigma)) per phase. The noise stream is seeded; a fresh oracle with
    the same seed gives the same records for the same calls.
    """

    def __init__(self, *, idle_fraction: float = 0.2, launch_overhead_s: float = 5e-6, noise_sigma: float = 0.05,
                 seed: int = 0):
        if not 0.0 <= idle_fraction < 1.0:
            raise ValueError(f"idle_fraction must be in [0, 1), got {idle_fraction!r}")
        if launch_overhead_s < 0:
            raise ValueError(f"launch_overhead_s must be >= 0, got {launch_overhead_s!r}")
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma!r}")
        self.idle_fraction = idle_fraction
        self.launch_overhead_s = launch_overhead_s
        self.noise_sigma = noise_sigma
        self._rng = np.random.default_rng(seed)

    def measure(self, points: list[SamplePoint]) -> list[dict]:
        return [self._one(p) for p in points]

    def _one(self, p: SamplePoint) -> dict:
        template, gpu = p.template()
        totals = template.totals(Segment.prefill(p.batch, p.prompt_len),
                                 Segment.decode(p.batch, p.prompt_len, p.gen_tokens))
        kernels_per_pass = template.n_nodes * template.arch.num_layers + HEAD_KERNELS_PER_PASS
        idle_w = self.idle_fraction * gpu.tdp_w
        noise = self._rng.lognormal(0.0, self.noise_sigma, size=2)
        out = {}
        for i, (phase, passes) in enumerate((("prefill", 1), ("decode", max(p.gen_tokens - 1, 0)))):
            t_roof = float(np.asarray(getattr(totals, f"{phase}_time_s")).reshape(-1)[0])
            e, t = simulated_phase_energy_j(t_roof, passes * kernels_per_pass, self.launch_overhead_s, idle_w,
                                            gpu.tdp_w, p.n_gpu)
            out[phase] = (float(e * noise[i]), float(t))
        return {
            "model": p.model, "arch": p.arch_dict(), "dtype": p.dtype, "gpu": gpu.name, "n_gpu": p.n_gpu,
            "batch": p.batch, "prompt_len": p.prompt_len, "gen_tokens": p.gen_tokens,
            "prefill_energy_j": out["prefill"][0], "decode_energy_j": out["decode"][0],
            "request_energy_j": out["prefill"][0] + out["decode"][0],
            "request_time_s": out["prefill"][1] + out["decode"][1],
            "engine": SIMULATOR_ENGINE, "source": SIMULATOR_SOURCE,
        }


# --- priors -------------------------------------------------------------------------------------

def prior_architectures() -> dict[str, dict[str, Any]]:
    """Architecture prior A: published configs' key fields, model name -> HF config dict (copies)."""
    return {k: dict(v) for k, v in _PRIOR_ARCHS.items()}


@functools.lru_cache(maxsize=1)
def _trace_rows() -> tuple[tuple[int, int], ...]:
    text = resources.files("llmco2_serve.data").joinpath(TRACE_FILE).read_text(encoding="utf-8")
    rows = []
    for i, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            rows.append((max(int(row["ContextTokens"]), 1), max(int(row["GeneratedTokens"]), 1)))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{TRACE_FILE}:{i}: bad ContextTokens/GeneratedTokens ({e})") from e
    if not rows:
        raise ValueError(f"{TRACE_FILE}: no rows")
    return tuple(rows)


def inference_prior() -> np.ndarray:
    """Inference prior I: (prompt_len, gen_tokens) pairs of the Azure LLM inference trace slice, (N, 2)."""
    return np.array(_trace_rows(), dtype=np.int64)


def _fits(point: SamplePoint) -> bool:
    template, gpu = point.template()
    return template.weight_bytes() <= WEIGHT_MEMORY_FRACTION * gpu.memory_gb * 1e9 * point.n_gpu


def sample_from_priors(n: int, rng: np.random.Generator, *, archs: Mapping[str, Mapping] | None = None,
                       gpus: Sequence[str] = DEFAULT_GPUS, dtypes: Sequence[str] = ("bfloat16",),
                       n_gpus: Sequence[int] = (1,), batches: Sequence[int] = (1, 2),
                       max_tries: int = 100) -> list[SamplePoint]:
    """Line 12: ``n`` points from A x I x H (uniform over archs, GPUs, dtypes, n_gpu and batch; request
    shapes drawn from the trace). Points whose weights do not fit the GPUs' memory are redrawn."""
    archs = dict(archs if archs is not None else _PRIOR_ARCHS)
    names = sorted(archs)
    trace = inference_prior()
    for label, seq in (("archs", names), ("gpus", gpus), ("dtypes", dtypes), ("n_gpus", n_gpus), ("batches", batches)):
        if len(seq) == 0:
            raise ValueError(f"prior {label!r} is empty")
    out: list[SamplePoint] = []
    while len(out) < n:
        for _ in range(max_tries):
            prompt_len, gen_tokens = trace[rng.integers(len(trace))]
            name = names[rng.integers(len(names))]
            p = SamplePoint(model=name, arch=archs[name], gpu=gpus[rng.integers(len(gpus))],
                            n_gpu=int(n_gpus[rng.integers(len(n_gpus))]), dtype=dtypes[rng.integers(len(dtypes))],
                            batch=int(batches[rng.integers(len(batches))]), prompt_len=int(prompt_len),
                            gen_tokens=int(gen_tokens))
            if _fits(p):
                out.append(p)
                break
        else:
            raise ValueError(f"no prior point fits GPU memory after {max_tries} draws; check the gpus/archs priors")
    return out


# --- Algorithm 1 pieces -------------------------------------------------------------------------

def _check_ranges(ranges: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for k, c in ranges.items():
        if k not in RANGE_DIMENSIONS:
            raise ValueError(f"ranges has unknown dimension {k!r} (known: {', '.join(RANGE_DIMENSIONS)})")
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise ValueError(f"ranges[{k!r}] must be an integer >= 0, got {c!r}")
        out[k] = int(c)
    return out


def fine_grained_sample(point: SamplePoint, n: int, ranges: Mapping[str, int],
                        rng: np.random.Generator) -> list[SamplePoint]:
    """Line 4: ``n`` points within +-C of ``point`` per dimension in ``ranges`` (values clipped to >= 1)."""
    ranges = _check_ranges(ranges)
    out = []
    for _ in range(n):
        changes: dict[str, int] = {}
        arch = point.arch_dict()
        for dim, c in ranges.items():
            base = point.layers if dim == "layers" else getattr(point, dim)
            value = max(1, base + int(rng.integers(-c, c + 1)))
            if dim == "layers":
                arch[_layer_key(arch)] = value
            else:
                changes[dim] = value
        out.append(SamplePoint(model=point.model, arch=arch, gpu=point.gpu, n_gpu=point.n_gpu, dtype=point.dtype,
                               batch=changes.get("batch", point.batch),
                               prompt_len=changes.get("prompt_len", point.prompt_len),
                               gen_tokens=changes.get("gen_tokens", point.gen_tokens)))
    return out


def split_train_test(items: Sequence, rng: np.random.Generator, test_fraction: float = 0.2) -> tuple[list, list]:
    """Shuffle and split: round(test_fraction x n) items to the test set, the rest to training."""
    order = rng.permutation(len(items))
    n_test = int(round(test_fraction * len(items)))
    test = [items[i] for i in order[:n_test]]
    train = [items[i] for i in order[n_test:]]
    return train, test


def relative_errors(predicted_j, measured_j) -> np.ndarray:
    """|E_hat / E - 1| per record (fraction)."""
    predicted_j = np.asarray(predicted_j, np.float64)
    measured_j = np.asarray(measured_j, np.float64)
    if predicted_j.shape != measured_j.shape:
        raise ValueError(f"predict_fn returned shape {predicted_j.shape}, expected {measured_j.shape}")
    if not np.all(measured_j > 0):
        raise ValueError("request_energy_j must be > 0 in every test record to compute a relative error")
    return np.abs(predicted_j / measured_j - 1.0)


def select_focus(errors: np.ndarray, k: int, threshold: float) -> list[int]:
    """Line 17: indices of the ``k`` largest errors above ``threshold``, largest first (ties by index)."""
    errors = np.asarray(errors, np.float64)
    order = sorted(range(len(errors)), key=lambda i: (-errors[i], i))
    return [i for i in order if errors[i] > threshold][:k]


def gnn_train_predict(epochs: int = 200, seed: int = 0, hidden: int = 24) -> tuple[Callable, Callable]:
    """(train_fn, predict_fn) for the LLMCO2 GNN on record dicts; predict_fn returns request energy (J)."""
    from .dataset import samples_from_records
    from .train import TrainConfig, predict_samples, train_gnn

    def parse(records):
        return samples_from_records([parse_record(r, f"sampling record {i}") for i, r in enumerate(records)])

    def train_fn(records):
        cfg = TrainConfig(hidden=hidden, epochs=epochs, warmup_epochs=max(1, epochs // 3), seed=seed)
        return train_gnn(parse(records), cfg)

    def predict_fn(model, records):
        return predict_samples(model, parse(records))["request"]

    return train_fn, predict_fn


class SamplingRound(NamedTuple):
    round: int
    n_train: int
    n_test: int
    mape: float  # mean relative error of request energy on TD after this round's training (fraction)


def _measure(oracle: MeasurementOracle, points: list[SamplePoint]) -> list[tuple[SamplePoint, dict]]:
    records = oracle.measure(points)
    if len(records) != len(points):
        raise ValueError(f"oracle returned {len(records)} records for {len(points)} points")
    for i, r in enumerate(records):
        parse_record(r, f"oracle record {i}")  # raises RecordError naming the bad field
    return list(zip(points, records))


@dataclass
class _State:
    train: list = field(default_factory=list)  # (point, record)
    test: list = field(default_factory=list)


def focused_sampling(oracle: MeasurementOracle, *, initial: int = 50, per_point: int = 100,
                     ranges: Mapping[str, int] = DEFAULT_RANGES, error_threshold: float = 0.05, max_rounds: int = 10,
                     focus: int = 10, test_fraction: float = 0.2, train_fn: Callable | None = None,
                     predict_fn: Callable | None = None, epochs: int = 200, seed: int = 0,
                     prior_kwargs: Mapping[str, Any] | None = None,
                     ) -> tuple[list[dict], list[dict], list[SamplingRound]]:
    """Algorithm 1. Returns (train_records, test_records, history).

    ``initial`` = A, ``per_point`` = B, ``ranges`` = C per dimension, ``error_threshold`` = e (fraction).
    ``train_fn(records) -> model`` and ``predict_fn(model, records) -> request energies (J)`` default to
    the LLMCO2 GNN (:func:`gnn_train_predict` with ``epochs``). ``history[r]`` describes TD and the
    error after round r (round 0: the initial sample). At most ``max_rounds`` refinement rounds run.
    """
    if (train_fn is None) != (predict_fn is None):
        raise ValueError("pass both train_fn and predict_fn, or neither")
    if train_fn is None:
        train_fn, predict_fn = gnn_train_predict(epochs=epochs, seed=seed)
    for name, v, lo in (("initial", initial, 1), ("per_point", per_point, 1), ("focus", focus, 1),
                        ("max_rounds", max_rounds, 0)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    ranges = _check_ranges(ranges)
    rng = np.random.default_rng(seed)
    state = _State()

    def add(measured):  # lines 13-14 / 19-21: 80% to training, 20% to TD
        tr, te = split_train_test(measured, rng, test_fraction)
        state.train += tr
        state.test += te

    def train_and_test():  # lines 13/20 and 15/22
        model = train_fn([r for _, r in state.train])
        test_records = [r for _, r in state.test]
        errors = relative_errors(predict_fn(model, test_records), [r["request_energy_j"] for r in test_records])
        return errors

    add(_measure(oracle, sample_from_priors(initial, rng, **dict(prior_kwargs or {}))))  # line 12
    if not state.train or not state.test:
        raise ValueError(f"initial={initial} leaves an empty training or test set at test_fraction={test_fraction}")
    errors = train_and_test()
    history = [SamplingRound(0, len(state.train), len(state.test), float(errors.mean()))]
    rnd = 0
    while history[-1].mape > error_threshold and rnd < max_rounds:  # line 16
        rnd += 1
        parents = [state.test[i][0] for i in select_focus(errors, focus, error_threshold)]  # line 17
        new_points = [q for p in parents for q in fine_grained_sample(p, per_point, ranges, rng)]  # lines 2-6
        add(_measure(oracle, new_points))  # lines 8, 18-19, 21
        errors = train_and_test()
        history.append(SamplingRound(rnd, len(state.train), len(state.test), float(errors.mean())))
    return [r for _, r in state.train], [r for _, r in state.test], history
