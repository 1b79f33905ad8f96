"""Torch-free inference for :class:`~llmco2_serve.predictors.gnn.LLMCO2GNN` weights.

The server predicts every request; importing torch and PyG for that would add ~500 MB and seconds
of start-up to vLLM's API process, so the forward pass is repeated here in NumPy.
"""

from __future__ import annotations

import numpy as np

# Arrays of an optional fixed log-space offset (``features.roofline_offset``): the network then
# predicts log(measured / offset energy) instead of the log energy itself.
OFFSET_KEYS = ("offset_idx", "offset_coef", "offset_bias", "offset_mean", "offset_std", "offset_out")


def log_offset(global_x: np.ndarray, idx: np.ndarray, coef: np.ndarray, bias: np.ndarray, mean: np.ndarray,
               std: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(R, outputs) offset from standardised global features (R, G): the columns ``idx`` are
    un-standardised (they are log1p of positive magnitudes) and turned back into logs of the
    magnitudes ``m``; each term ``t`` is ``m @ coef[:, t] + bias[t]`` (the log of a product of
    powers) and output ``o`` is the log of the sum of its terms (``out[t] == o``)."""
    raw = global_x[..., np.asarray(idx, np.int64)] * std + mean
    terms = np.log(np.maximum(np.expm1(raw), 1e-30)) @ coef + bias
    out = np.asarray(out, np.int64)
    cols = []
    for o in range(int(out.max()) + 1):
        t = terms[..., out == o]
        top = t.max(axis=-1, keepdims=True)
        cols.append((top + np.log(np.exp(t - top).sum(axis=-1, keepdims=True)))[..., 0])
    return np.stack(cols, axis=-1)


def mean_adjacency(edge_index: np.ndarray, n_nodes: int) -> np.ndarray:
    """A[i, j] = 1/indeg(i) for each edge j -> i (SAGEConv's mean aggregation as a matrix)."""
    a = np.zeros((n_nodes, n_nodes))
    src, dst = edge_index
    np.add.at(a, (dst, src), 1.0)
    deg = a.sum(1, keepdims=True)
    return np.divide(a, deg, out=np.zeros_like(a), where=deg > 0)


class NumpyGNN:
    """Inference-only copy of :class:`LLMCO2GNN` for graphs that share one structure.

    ``forward(node_x (R, n, F), adjacency (n, n), global_x (R, G)) -> (R, outputs)``.
    """

    def __init__(self, weights: dict[str, np.ndarray]):
        w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self.c1_l, self.c1_lb, self.c1_r = w["conv1.lin_l.weight"].T, w["conv1.lin_l.bias"], w["conv1.lin_r.weight"].T
        self.c2_l, self.c2_lb, self.c2_r = w["conv2.lin_l.weight"].T, w["conv2.lin_l.bias"], w["conv2.lin_r.weight"].T
        self.l1, self.l1b = w["lin1.weight"].T, w["lin1.bias"]
        self.l2, self.l2b = w["lin2.weight"].T, w["lin2.bias"]
        self.offset = None
        if "offset_coef" in w:  # weights trained on top of a fixed physics offset (gnn.LLMCO2GNN)
            self.offset = tuple(w[k] for k in OFFSET_KEYS)

    def forward(self, node_x: np.ndarray, adjacency: np.ndarray, global_x: np.ndarray) -> np.ndarray:
        h = np.maximum((adjacency @ node_x) @ self.c1_l + self.c1_lb + node_x @ self.c1_r, 0.0)
        h = np.maximum((adjacency @ h) @ self.c2_l + self.c2_lb + h @ self.c2_r, 0.0)
        z = np.concatenate([h.mean(axis=-2), global_x], axis=-1)
        out = np.maximum(z @ self.l1 + self.l1b, 0.0) @ self.l2 + self.l2b
        if self.offset is not None:
            out = out + log_offset(global_x, *self.offset)
        return out
