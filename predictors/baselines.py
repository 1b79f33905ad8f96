"""The three baselines of the LLMCO2 paper (section 5.1) and the GNN behind one interface.

Every predictor has ``name``, ``has_phases``, ``fit(samples) -> self`` and
``predict(samples) -> {"prefill", "decode", "request"}`` (joules per request; ``prefill`` and
``decode`` are ``None`` for methods that do not split the phases).

* :class:`LLMCarbonBaseline` -- the FLOP-count equation of LLMCarbon (Faiz et al., ICLR 2024):
  ``t = FLOPs / (n_gpu * peak * u)``, ``E = n_gpu * P * t`` (their ``inference_co2eq`` in
  SotaroKaneda/MLCarbon ``model.py``, with PUE = 1 since we predict GPU energy). P is the GPU's TDP
  from the packaged table; the efficiency u is the one free constant, fitted on the training set
  (see :func:`fit_llmcarbon_efficiency`). FLOPs are the kernel graph's per-phase operation counts
  (LLMCarbon itself writes 2 * params * tokens; the graph adds attention, norms and the LM head) --
  memory traffic is ignored, which is the point of this baseline.
* :class:`RandomForestBaseline` -- DeepEn-style (Tu et al., 2023): a random forest on flat
  features, one whole-request target, no phase split, no Roofline or hardware features.
* :class:`NNLQPBaseline` -- NNLQP-style (Liu et al., 2023): the same per-layer kernel graph and
  GNN shape as LLMCO2, but node features with prefill and decode summed (O, M, I), no Roofline
  performance, no hardware features, one output (request energy).
* :class:`GNNPredictor` -- the LLMCO2 GNN (``train.train_gnn`` / ``train.predict_samples``).

Labels that are not positive (NVML counter noise, ``shared/README.md``) cannot enter a log-space
fit; each baseline leaves them out of its fit and records how many in ``n_fit_skipped``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .dataset import GraphSample, template_for_record
from .features import GLOBAL_FEATURE_NAMES, NODE_FEATURE_NAMES, Standardizer
from .gnn import LLMCO2GNN
from .train import TrainConfig, TrainedGNN, predict_samples, train_gnn

__all__ = [
    "EnergyPredictor",
    "PREDICTOR_NAMES",
    "FLAT_FEATURE_NAMES",
    "NNLQP_NODE_FEATURE_NAMES",
    "llmcarbon_energy_j",
    "fit_llmcarbon_efficiency",
    "flat_features",
    "nnlqp_node_features",
    "LLMCarbonBaseline",
    "RandomForestBaseline",
    "NNLQPBaseline",
    "GNNPredictor",
    "make_predictor",
]

Predictions = dict[str, "np.ndarray | None"]


@runtime_checkable
class EnergyPredictor(Protocol):
    name: str
    has_phases: bool

    def fit(self, samples: Sequence[GraphSample]) -> "EnergyPredictor": ...

    def predict(self, samples: Sequence[GraphSample]) -> Predictions: ...


def _require_samples(samples: Sequence[GraphSample], what: str) -> None:
    if len(samples) == 0:
        raise ValueError(f"{what}: no samples")


def _positive(values: np.ndarray) -> np.ndarray:
    return np.isfinite(values) & (values > 0)


# ----------------------------------------------------------------------------------------------
# LLMCarbon


def llmcarbon_energy_j(flops, peak_flops_per_s, tdp_w, n_gpu, efficiency):
    """LLMCarbon operational energy of an inference, joules (Faiz et al. 2024; MLCarbon ``inference_co2eq``).

    ``time_s = flops / (n_gpu * peak_flops_per_s * efficiency)`` and
    ``energy_j = n_gpu * tdp_w * time_s`` (PUE = 1: GPU energy only).
    flops: operations of the whole workload, all GPUs together (FLOP); peak_flops_per_s: one GPU's
    dense peak for the compute dtype (FLOP/s); tdp_w: one GPU's board power (W); efficiency:
    achieved / peak throughput (dimensionless, 0 < u). n_gpu cancels, as in LLMCarbon.
    """
    time_s = np.asarray(flops, np.float64) / (np.asarray(n_gpu, np.float64) * peak_flops_per_s * efficiency)
    return np.asarray(n_gpu, np.float64) * tdp_w * time_s


def fit_llmcarbon_efficiency(flops, peak_flops_per_s, tdp_w, energy_j) -> float:
    """Least-squares efficiency u in log space: argmin_u sum_i (log E_i - log E_hat_i(u))^2.

    ``log E_hat_i = log(flops_i * tdp_i / peak_i) - log u`` is linear in ``log u`` with slope -1, so
    the minimiser is the geometric mean of ``flops_i * tdp_i / (peak_i * E_i)``. Log space because the
    labels span four orders of magnitude and MAPE is a relative error. Rows with E <= 0 or no
    FLOPs have no logarithm; the caller must leave them out.
    """
    f = np.asarray(flops, np.float64)
    e = np.asarray(energy_j, np.float64)
    if f.size == 0:
        raise ValueError("fit_llmcarbon_efficiency: no rows to fit")
    if np.any(~_positive(e)) or np.any(~_positive(f)):
        raise ValueError("fit_llmcarbon_efficiency: energy_j and flops must be positive and finite")
    log_u = np.log(f * np.asarray(tdp_w, np.float64) / np.asarray(peak_flops_per_s, np.float64)) - np.log(e)
    return float(np.exp(log_u.mean()))


def _llmcarbon_inputs(samples: Sequence[GraphSample]):
    """(prefill FLOPs, decode FLOPs, peak FLOP/s, TDP W, n_gpu) per sample, from its record's GPU."""
    pre = np.array([s.totals["prefill_flops"] for s in samples], np.float64)
    dec = np.array([s.totals["decode_flops"] for s in samples], np.float64)
    peak, tdp, n_gpu = [], [], []
    for s in samples:
        template, gpu = template_for_record(s.record)
        peak.append(template.peak_ops_per_s)
        tdp.append(gpu.tdp_w)
        n_gpu.append(s.record.n_gpu)
    return pre, dec, np.array(peak), np.array(tdp), np.array(n_gpu, np.float64)


class LLMCarbonBaseline:
    """FLOP-count equation with one fitted efficiency; gives prefill and decode (their FLOPs)."""

    name = "llmcarbon"
    has_phases = True

    def __init__(self, seed: int = 0):
        self.seed = seed  # deterministic fit; kept for the common constructor
        self.efficiency: float | None = None
        self.n_fit_rows = 0
        self.n_fit_skipped = 0

    def fit(self, samples: Sequence[GraphSample]) -> "LLMCarbonBaseline":
        _require_samples(samples, "LLMCarbonBaseline.fit")
        pre, dec, peak, tdp, _ = _llmcarbon_inputs(samples)
        req = np.array([s.request_energy_j for s in samples], np.float64)
        keep = _positive(req) & _positive(pre + dec)
        if not keep.any():
            raise ValueError("LLMCarbonBaseline.fit: no sample has a positive request_energy_j")
        self.efficiency = fit_llmcarbon_efficiency((pre + dec)[keep], peak[keep], tdp[keep], req[keep])
        self.n_fit_rows, self.n_fit_skipped = int(keep.sum()), int((~keep).sum())
        return self

    def predict(self, samples: Sequence[GraphSample]) -> Predictions:
        if self.efficiency is None:
            raise RuntimeError("LLMCarbonBaseline.predict before fit")
        pre, dec, peak, tdp, n_gpu = _llmcarbon_inputs(samples)
        e_pre = llmcarbon_energy_j(pre, peak, tdp, n_gpu, self.efficiency)
        e_dec = llmcarbon_energy_j(dec, peak, tdp, n_gpu, self.efficiency)
        return {"prefill": e_pre, "decode": e_dec, "request": e_pre + e_dec}


# ----------------------------------------------------------------------------------------------
# Flat features (DeepEn) and summed-phase graph features (NNLQP)

# Architecture and inference columns of the LLMCO2 global features; no phase split, no hardware.
_ARCH_INFERENCE_COLUMNS = (
    "weight_bits", "activation_bits", "log_hidden", "log_mlp_width", "log_heads", "log_kv_heads",
    "log_head_dim", "log_layers", "log_vocab", "log_experts", "log_top_k", "log_kernels_per_layer",
    "unfused_attention", "layernorm", "gated_mlp", "log_batch", "log_prompt_len", "log_gen_tokens",
)
FLAT_FEATURE_NAMES = _ARCH_INFERENCE_COLUMNS + ("log_request_flops", "log_request_bytes")


def _column_indices(names: Sequence[str], wanted: Sequence[str], where: str) -> list[int]:
    missing = [w for w in wanted if w not in names]
    if missing:
        raise KeyError(f"{where}: feature(s) {missing} not in {where} names; the feature layout changed")
    return [list(names).index(w) for w in wanted]


def flat_features(samples: Sequence[GraphSample]) -> np.ndarray:
    """(R, len(FLAT_FEATURE_NAMES)): architecture, batch/prompt/gen and whole-request FLOPs and bytes.

    Prefill and decode are summed (no phase split); GPU peaks, bandwidths, TDP and n_gpu are left
    out (DeepEn/NNLQP have no hardware features).
    """
    idx = _column_indices(GLOBAL_FEATURE_NAMES, _ARCH_INFERENCE_COLUMNS, "GLOBAL_FEATURE_NAMES")
    rows = []
    for s in samples:
        flops = s.totals["prefill_flops"] + s.totals["decode_flops"]
        mem = s.totals["prefill_bytes"] + s.totals["decode_bytes"]
        rows.append(np.concatenate([s.global_x[idx], [np.log1p(flops), np.log1p(mem)]]))
    return np.array(rows, np.float64).reshape(len(samples), len(FLAT_FEATURE_NAMES))


_STATIC_NODE_COLUMNS = tuple(n for n in NODE_FEATURE_NAMES if n.startswith("kind_")) + ("log_d_in", "log_d_out")
_SUMMED = ("log_ops", "log_mem_bytes", "log_net_bytes")
NNLQP_NODE_FEATURE_NAMES = _STATIC_NODE_COLUMNS + tuple(f"request_{f}" for f in _SUMMED)


def nnlqp_node_features(sample: GraphSample) -> np.ndarray:
    """(n_nodes, len(NNLQP_NODE_FEATURE_NAMES)): kind, dims and log1p(prefill + decode) of O, M, I.

    The sample's node features hold log1p of the prefill totals and of the per-decode-step values
    (``features.py``); the decode total is the per-step value times the steps. Roofline performance
    and time are dropped.
    """
    x = sample.node_x
    static = x[:, _column_indices(NODE_FEATURE_NAMES, _STATIC_NODE_COLUMNS, "NODE_FEATURE_NAMES")]
    pre = np.expm1(x[:, _column_indices(NODE_FEATURE_NAMES, [f"prefill_{f}" for f in _SUMMED], "NODE_FEATURE_NAMES")])
    step = np.expm1(x[:, _column_indices(NODE_FEATURE_NAMES, [f"decode_step_{f}" for f in _SUMMED],
                                         "NODE_FEATURE_NAMES")])
    # features.py divides decode totals by max(steps, 1); a zero-step decode has zero costs anyway
    total = pre + step * max(sample.decode_steps, 1.0)
    return np.concatenate([static, np.log1p(total)], axis=1)


# ----------------------------------------------------------------------------------------------
# DeepEn-style random forest


class RandomForestBaseline:
    """Random forest (scikit-learn, seeded) on :func:`flat_features`, target log request energy."""

    name = "random-forest"
    has_phases = False

    def __init__(self, seed: int = 0, n_estimators: int = 300, min_samples_leaf: int = 1):
        self.seed, self.n_estimators, self.min_samples_leaf = seed, n_estimators, min_samples_leaf
        self.model = None
        self.n_fit_rows = 0
        self.n_fit_skipped = 0

    def fit(self, samples: Sequence[GraphSample]) -> "RandomForestBaseline":
        from sklearn.ensemble import RandomForestRegressor  # heavy import, only where used

        _require_samples(samples, "RandomForestBaseline.fit")
        y = np.array([s.request_energy_j for s in samples], np.float64)
        keep = _positive(y)
        if not keep.any():
            raise ValueError("RandomForestBaseline.fit: no sample has a positive request_energy_j")
        x = flat_features(samples)
        self.model = RandomForestRegressor(n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf,
                                           random_state=self.seed, n_jobs=1)
        self.model.fit(x[keep], np.log(y[keep]))
        self.n_fit_rows, self.n_fit_skipped = int(keep.sum()), int((~keep).sum())
        return self

    def predict(self, samples: Sequence[GraphSample]) -> Predictions:
        if self.model is None:
            raise RuntimeError("RandomForestBaseline.predict before fit")
        return {"prefill": None, "decode": None, "request": np.exp(self.model.predict(flat_features(samples)))}


# ----------------------------------------------------------------------------------------------
# NNLQP-style GNN


def _stack_graphs(node_xs: Sequence[np.ndarray], edge_indices: Sequence[np.ndarray]):
    offsets = np.cumsum([0] + [x.shape[0] for x in node_xs[:-1]])
    x = np.concatenate(node_xs)
    ei = np.concatenate([e + o for e, o in zip(edge_indices, offsets)], axis=1)
    batch = np.concatenate([np.full(n.shape[0], g) for g, n in enumerate(node_xs)])
    return x, ei, batch


class NNLQPBaseline:
    """2 SAGEConv + 2 linear layers (``gnn.LLMCO2GNN`` with one output) on summed-phase features.

    Output: log request energy, per transformer layer when ``config.layer_scaled`` (energy =
    layers x exp(output), as ``train.train_gnn``): NNLQP's graph is the whole network, so its
    prediction grows with depth; our graph is one layer, and scaling by the layer count is the
    analogue. Training as ``train.train_gnn``: the same :class:`TrainConfig` (Adam, lr, weight
    decay, epochs, hidden width), a warm-up on squared log error, then mean relative error
    |E_hat / E - 1|; rows with a non-positive label are left out of the loss.
    """

    name = "nnlqp"
    has_phases = False

    def __init__(self, seed: int = 0, config: TrainConfig | None = None):
        # ``seed`` wins over ``config.seed`` so that every predictor is seeded the same way
        self.config = dataclasses.replace(config or TrainConfig(), seed=seed)
        self.seed = seed
        self.model: LLMCO2GNN | None = None
        self.standardizer: Standardizer | None = None
        self.n_fit_rows = 0
        self.n_fit_skipped = 0

    def _scale(self, samples) -> np.ndarray:
        layer_scaled = getattr(self.config, "layer_scaled", False)
        return np.array([float(s.layers) if layer_scaled else 1.0 for s in samples])

    def _tensors(self, samples):
        x, ei, batch = _stack_graphs([nnlqp_node_features(s) for s in samples], [s.edge_index for s in samples])
        return x, ei, batch, flat_features(samples)

    def fit(self, samples: Sequence[GraphSample]) -> "NNLQPBaseline":
        _require_samples(samples, "NNLQPBaseline.fit")
        cfg = self.config
        y = np.array([s.request_energy_j for s in samples], np.float64)
        keep = _positive(y)
        if not keep.any():
            raise ValueError("NNLQPBaseline.fit: no sample has a positive request_energy_j")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        x, ei, batch, gx = self._tensors(samples)
        std = Standardizer.fit(x, gx)
        X = torch.tensor(std.nodes(x), dtype=torch.float32)
        G = torch.tensor(std.globals(gx), dtype=torch.float32)
        EI = torch.tensor(ei, dtype=torch.long)
        B = torch.tensor(batch, dtype=torch.long)
        mask = torch.tensor(keep)
        scale = torch.tensor(self._scale(samples), dtype=torch.float32)
        y_t = torch.tensor(np.where(keep, y, 1.0), dtype=torch.float32)
        log_y = torch.log(y_t / scale)  # per-layer target when layer_scaled

        model = LLMCO2GNN(X.shape[1], G.shape[1], hidden=cfg.hidden, outputs=1)
        with torch.no_grad():  # start at the data's scale, as train_gnn does
            model.lin2.bias[0] = log_y[mask].mean()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for epoch in range(cfg.epochs):
            opt.zero_grad()
            o = model(X, EI, B, G)[:, 0]
            if epoch < cfg.warmup_epochs:
                loss = ((o - log_y)[mask] ** 2).mean()
            else:
                loss = (torch.exp(o.clamp(max=30)) * scale / y_t - 1).abs()[mask].mean()
            loss.backward()
            opt.step()
        self.model, self.standardizer = model.eval(), std
        self.n_fit_rows, self.n_fit_skipped = int(keep.sum()), int((~keep).sum())
        return self

    def predict(self, samples: Sequence[GraphSample]) -> Predictions:
        if self.model is None or self.standardizer is None:
            raise RuntimeError("NNLQPBaseline.predict before fit")
        x, ei, batch, gx = self._tensors(samples)
        with torch.no_grad():
            o = self.model(torch.tensor(self.standardizer.nodes(x), dtype=torch.float32),
                           torch.tensor(ei, dtype=torch.long), torch.tensor(batch, dtype=torch.long),
                           torch.tensor(self.standardizer.globals(gx), dtype=torch.float32))[:, 0]
        return {"prefill": None, "decode": None, "request": np.exp(o.double().numpy()) * self._scale(samples)}


# ----------------------------------------------------------------------------------------------
# LLMCO2 GNN


class GNNPredictor:
    """The LLMCO2 GNN through ``train.train_gnn`` / ``train.predict_samples`` (prefill + decode)."""

    name = "gnn"
    has_phases = True

    def __init__(self, seed: int = 0, config: TrainConfig | None = None):
        # ``seed`` wins over ``config.seed`` so that every predictor is seeded the same way
        self.config = dataclasses.replace(config or TrainConfig(), seed=seed)
        self.seed = seed
        self.trained: TrainedGNN | None = None

    def fit(self, samples: Sequence[GraphSample]) -> "GNNPredictor":
        _require_samples(samples, "GNNPredictor.fit")
        self.trained = train_gnn(list(samples), self.config)
        return self

    def predict(self, samples: Sequence[GraphSample]) -> Predictions:
        if self.trained is None:
            raise RuntimeError("GNNPredictor.predict before fit")
        out = predict_samples(self.trained, list(samples))
        return {"prefill": out["prefill"], "decode": out["decode"], "request": out["request"]}


_PREDICTORS: dict[str, Callable[..., EnergyPredictor]] = {
    "gnn": GNNPredictor,
    "llmcarbon": LLMCarbonBaseline,
    "random-forest": RandomForestBaseline,
    "nnlqp": NNLQPBaseline,
}
PREDICTOR_NAMES = tuple(_PREDICTORS)


def make_predictor(name: str, seed: int = 0) -> EnergyPredictor:
    """A fresh, unfitted predictor: "gnn", "llmcarbon", "random-forest" or "nnlqp"."""
    try:
        factory = _PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; expected one of {', '.join(PREDICTOR_NAMES)}") from None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return factory(seed=seed)
