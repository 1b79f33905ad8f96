"""Training of the LLMCO2 GNN with a relative-error loss (seeded, reproducible on CPU).

Choices the paper leaves open (written down here and in docs/predictors.md):
* Targets: prefill energy and the mean energy of one decode step, per transformer layer (the graph is
  one layer; energy = layers x exp(output)), in log space.
* Small and strongly regularised (hidden 24, weight decay 3e-2, 600 epochs): with 7-8 architectures
  to learn from, leave-one-architecture-out accuracy (benchmarks/accuracy.py) drops with larger nets.
* Loss: mean relative error |E_hat / E - 1| over prefill, decode and whole-request energy, after a
  short warm-up on squared log error (relative error from a random start has exploding gradients).
  Rows whose phase label is not positive (counter noise, a decode of zero steps) are left out of that
  phase's loss term only; they still count for the request term. Rows with no phase label at all
  (aggregated steady-state records: one request energy at an average batch) are first-class: the
  warm-up fits their request energy in squared log error, then the request term as for the others.
* Optimiser: Adam, lr 1e-3 (paper 5.1), full batch (our data sets are smaller than the paper's 512).
* Roofline offset (``TrainConfig.roofline_offset``; default: on when the records are aggregated
  steady-state serving runs, i.e. the ``vllm`` profile, off for single measured requests, i.e.
  ``hf-eager``, whose weights stay as they were): the outputs are added to the log of the Roofline
  energy at TDP (``features.roofline_offset``), so the network learns measured / Roofline energy.
  Under continuous batching the per-sequence energy moves ~50x between batch 8 and 4,000; a
  held-out family then takes that batch dependence from the per-step physics rather than from a
  curve learnt on other families (leave-one-family-out, ``benchmarks/accuracy.py --profile vllm``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from .features import GLOBAL_FEATURE_NAMES, NODE_FEATURE_NAMES, Standardizer, roofline_offset
from .gnn import LLMCO2GNN, NumpyGNN, mean_adjacency
from .gnn_numpy import OFFSET_KEYS, log_offset


@dataclass
class TrainConfig:
    hidden: int = 24
    epochs: int = 600
    warmup_epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 3e-2
    seed: int = 0
    layer_scaled: bool = True  # outputs are per layer: energy = layers x exp(output)
    # outputs on top of the Roofline energy at TDP; None: on iff the records are aggregated steady-state
    roofline_offset: bool | None = None
    # weight decay of training with the offset (instead of weight_decay): the network then learns a
    # residual ratio that should stay near a constant; 0.03 -> 0.3 took the vllm profile's
    # leave-one-family-out mean MAPE from 40.7% to 20.6% (0.1: 23.2%, 1.0: 31.7%; benchmarks/accuracy.py)
    offset_weight_decay: float = 0.3


@dataclass
class TrainedGNN:
    weights: dict[str, np.ndarray]
    standardizer: Standardizer
    config: TrainConfig
    history: list = field(default_factory=list)

    def numpy_model(self) -> NumpyGNN:
        return NumpyGNN(self.weights)

    def predict_log(self, node_x: np.ndarray, edge_index: np.ndarray, global_x: np.ndarray) -> np.ndarray:
        """(R, n, F) node features of graphs sharing ``edge_index`` -> (R, 2) log-energies."""
        adj = mean_adjacency(edge_index, node_x.shape[-2])
        return self.numpy_model().forward(self.standardizer.nodes(node_x), adj, self.standardizer.globals(global_x))


def _stack(samples):
    xs, eis, batch, offset = [], [], [], 0
    for g, s in enumerate(samples):
        xs.append(s.node_x)
        eis.append(s.edge_index + offset)
        batch.append(np.full(s.node_x.shape[0], g))
        offset += s.node_x.shape[0]
    return np.concatenate(xs), np.concatenate(eis, axis=1), np.concatenate(batch), np.stack([s.global_x for s in samples])


def _targets(samples):
    pre = np.array([s.prefill_energy_j for s in samples])
    dec = np.array([s.decode_energy_j for s in samples])
    req = np.array([s.request_energy_j for s in samples])
    steps = np.array([s.decode_steps for s in samples])
    return pre, dec, req, steps


def _scale(samples, layer_scaled: bool):
    """Per-request multiplier of the outputs: the layer count (the graph is one layer), else 1."""
    return np.array([float(s.layers) if layer_scaled else 1.0 for s in samples])


def train_gnn(samples, config: TrainConfig | None = None) -> TrainedGNN:
    config = config or TrainConfig()
    torch.set_num_threads(1)  # tiny graphs: threads only add contention, and keep runs reproducible
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    x, ei, batch, gx = _stack(samples)
    std = Standardizer.fit(x, gx)
    X = torch.tensor(std.nodes(x), dtype=torch.float32)
    G = torch.tensor(std.globals(gx), dtype=torch.float32)
    EI = torch.tensor(ei, dtype=torch.long)
    B = torch.tensor(batch, dtype=torch.long)
    pre, dec, req, steps = _targets(samples)
    use_offset = config.roofline_offset
    if use_offset is None:
        use_offset = any(getattr(s.record, "aggregated", None) for s in samples)
    config = dataclasses.replace(config, roofline_offset=bool(use_offset))  # the metadata says which
    offset = roofline_offset(std, config.layer_scaled) if use_offset else None
    off = (log_offset(std.globals(gx), *(offset[k] for k in OFFSET_KEYS)) if offset is not None
           else np.zeros((len(samples), 2)))
    off_pre_t = torch.tensor(off[:, 0], dtype=torch.float32)
    off_dec_t = torch.tensor(off[:, 1], dtype=torch.float32)
    steps_t = torch.tensor(steps, dtype=torch.float32)
    scale_t = torch.tensor(_scale(samples, config.layer_scaled), dtype=torch.float32)
    m_pre = torch.tensor(np.nan_to_num(pre) > 0)
    m_dec = torch.tensor((steps > 0) & (np.nan_to_num(dec) > 0))
    m_req = torch.tensor(req > 0)
    y_pre = torch.tensor(np.where(m_pre.numpy(), pre, 1.0), dtype=torch.float32)
    y_dec = torch.tensor(np.where(m_dec.numpy(), dec, 1.0), dtype=torch.float32)
    y_req = torch.tensor(np.where(m_req.numpy(), req, 1.0), dtype=torch.float32)
    y_step = y_dec / steps_t.clamp(min=1.0) / scale_t
    y_pre_u = y_pre / scale_t

    model = LLMCO2GNN(len(NODE_FEATURE_NAMES), len(GLOBAL_FEATURE_NAMES), hidden=config.hidden, offset=offset)
    # Rows with a request energy and no phase label at all (aggregated steady-state records, or
    # any record without a split): the warm-up fits their request energy in log space instead.
    m_only = torch.tensor(np.isnan(pre) & np.isnan(dec)) & m_req
    if not (m_pre.any() or m_dec.any() or m_req.any()):
        raise ValueError(f"train_gnn: none of the {len(samples)} samples has a positive energy label")
    # A per-layer, per-sequence-step scale of the request-only rows: request / (layers x (steps + 1)).
    y_unit = y_req / scale_t / (steps_t + 1.0)
    with torch.no_grad():  # start near the data's scale so early relative errors stay bounded
        if offset is None:
            model.lin2.bias[0] = torch.log(y_pre_u[m_pre]).mean() if m_pre.any() else (
                torch.log(y_unit[m_only]).mean() if m_only.any() else 0.0)
            model.lin2.bias[1] = torch.log(y_step[m_dec]).mean() if m_dec.any() else (
                torch.log(y_unit[m_only]).mean() if m_only.any() else 0.0)
        else:  # the network's part: log(measured / Roofline at TDP); request-only rows: of the whole request
            e_off = (torch.exp(off_pre_t) + torch.exp(off_dec_t) * steps_t) * scale_t
            r_only = torch.log(y_req / e_off)[m_only].mean() if m_only.any() else 0.0
            model.lin2.bias[0] = (torch.log(y_pre_u) - off_pre_t)[m_pre].mean() if m_pre.any() else r_only
            model.lin2.bias[1] = (torch.log(y_step) - off_dec_t)[m_dec].mean() if m_dec.any() else r_only
    # (`llmco2 retrain` fine-tunes with ``weight_decay``: adapting to a deployment should move freely)
    decay = config.offset_weight_decay if use_offset else config.weight_decay
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=decay)
    history = []
    for epoch in range(config.epochs):
        opt.zero_grad()
        out = model(X, EI, B, G)
        o_pre, o_step = out[:, 0], out[:, 1]
        if epoch < config.warmup_epochs:
            terms = []
            if m_pre.any():
                terms.append(((o_pre - torch.log(y_pre_u))[m_pre] ** 2).mean())
            if m_dec.any():
                terms.append(((o_step - torch.log(y_step))[m_dec] ** 2).mean())
            m_req_term = m_only if (terms or m_only.any()) else m_req  # no phase label is usable: the request
            if m_req_term.any():
                e_req = (torch.exp(o_pre.clamp(max=30)) + torch.exp(o_step.clamp(max=30)) * steps_t) * scale_t
                terms.append(((torch.log(e_req) - torch.log(y_req))[m_req_term] ** 2).mean())
            loss = sum(terms)  # at least one term: some label is positive (checked above)
        else:
            e_pre = torch.exp(o_pre.clamp(max=30)) * scale_t
            e_dec = torch.exp(o_step.clamp(max=30)) * steps_t * scale_t
            terms = []
            if m_pre.any():
                terms.append((e_pre / y_pre - 1).abs()[m_pre].mean())
            if m_dec.any():
                terms.append((e_dec / y_dec - 1).abs()[m_dec].mean())
            if m_req.any():
                terms.append(((e_pre + e_dec) / y_req - 1).abs()[m_req].mean())
            loss = sum(terms) / len(terms)
        loss.backward()
        opt.step()
        if epoch % 100 == 0 or epoch == config.epochs - 1:
            history.append((epoch, float(loss.detach())))
    return TrainedGNN(model.numpy_weights(), std, config, history)


def predict_samples(trained: TrainedGNN, samples) -> dict[str, np.ndarray]:
    """Phase and request energies (J) for samples (any mix of graph structures)."""
    pre = np.empty(len(samples))
    dec = np.empty(len(samples))
    net = trained.numpy_model()
    for i, s in enumerate(samples):
        adj = mean_adjacency(s.edge_index, s.node_x.shape[0])
        o = net.forward(trained.standardizer.nodes(s.node_x)[None], adj, trained.standardizer.globals(s.global_x)[None])[0]
        sc = _scale([s], trained.config.layer_scaled)[0]
        pre[i] = np.exp(o[0]) * sc
        dec[i] = np.exp(o[1]) * s.decode_steps * sc
    return {"prefill": pre, "decode": dec, "request": pre + dec}


WEIGHTS_VERSION = "1"
# Weights with a Roofline offset (their own arrays, read by NumpyGNN): a new version, so the label
# (``llmco2.predictor``, and with it the calibration's deployment key) changes with the model form.
WEIGHTS_VERSION_ROOFLINE_OFFSET = "3"  # 3: with the fixed time per kernel (graph.KERNEL_LATENCY_S)


def mean_power_fraction_of_tdp(records) -> float:
    """Mean of request energy / request time / (n_gpu TDP) over records with a usable time."""
    from llmco2_serve.hardware.gpus import gpu_spec

    fractions = [r.request_energy_j / r.request_time_s / (gpu_spec(r.gpu).tdp_w * r.n_gpu)
                 for r in records if r.request_time_s and r.request_time_s > 0 and r.request_energy_j > 0]
    return float(np.mean(fractions)) if fractions else 0.35


def train_embedded(records, out_npz: str, *, data_source: str, config: TrainConfig | None = None,
                   accuracy: dict | None = None, profile: str | None = None, reproduce: str | None = None) -> dict:
    """Train on all ``records`` and write ``out_npz`` plus its ``.json`` metadata; returns the metadata."""
    import json
    import os

    from .dataset import samples_from_records

    config = config or TrainConfig()
    samples = samples_from_records(records)
    trained = train_gnn(samples, config)
    arrays = dict(trained.weights)
    arrays.update(trained.standardizer.to_arrays())
    config = trained.config  # with the offset choice resolved
    with open(out_npz, "wb") as f:
        np.savez(f, **arrays)
    engines = sorted({r.engine for r in records})
    gpus = sorted({r.gpu for r in records})
    metadata = {
        "version": WEIGHTS_VERSION_ROOFLINE_OFFSET if config.roofline_offset else WEIGHTS_VERSION,
        "model": "LLMCO2GNN (2x SAGEConv mean + 2x Linear)" + (
            " on log Roofline energy at TDP" if config.roofline_offset else ""),
        "train_config": config.__dict__,
        "layer_scaled": config.layer_scaled,
        "node_features": list(NODE_FEATURE_NAMES),
        "global_features": list(GLOBAL_FEATURE_NAMES),
        "training_data": {
            "source": data_source,
            "sha256": _sha256_of_records(records),
            "n_records": len(records),
            "models": sorted({r.model for r in records}),
            **({"families": sorted({r.family for r in records if r.family})} if any(r.family for r in records) else {}),
            **({"aggregated_steady_state_rows": sum(1 for r in records if r.aggregated)}
               if any(r.aggregated for r in records) else {}),
            "gpus": gpus,
        },
        "engine_profile": "+".join(engines) + "@" + "+".join(gpus),
        **({"profile": profile} if profile else {}),
        "mean_power_fraction_of_tdp": mean_power_fraction_of_tdp(records),
        "final_train_loss": trained.history[-1][1] if trained.history else None,
        "accuracy": accuracy or {},
        "reproduce": reproduce or f"llmco2 train --data <records.jsonl> --out {out_npz}",
    }
    with open(os.path.splitext(out_npz)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
        f.write("\n")
    return metadata


def _sha256_of_records(records) -> str:
    import hashlib
    import json

    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r.to_json(), sort_keys=True).encode())
    return h.hexdigest()


def trained_from_embedded(weights) -> TrainedGNN:
    """A :class:`TrainedGNN` view of packaged weights (``llmco2_serve.prediction.predictor.load_weights``)."""
    arrays = {k: v for k, v in weights.arrays.items() if not k.startswith("std_")}
    cfg = TrainConfig(**{k: v for k, v in weights.metadata.get("train_config", {}).items()
                         if k in TrainConfig.__dataclass_fields__})
    return TrainedGNN(arrays, Standardizer.from_arrays(weights.arrays), cfg)
