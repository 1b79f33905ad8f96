r"""The LLMCO2 energy GNN (paper section 4.1): two GraphSAGE layers, global features, two linear layers.

.. math::

    h^{(1)}_i = \mathrm{ReLU}(W_1 x_i + U_1 \operatorname{mean}_{j \to i} x_j + b_1) \\
    h^{(2)}_i = \mathrm{ReLU}(W_2 h^{(1)}_i + U_2 \operatorname{mean}_{j \to i} h^{(1)}_j + b_2) \\
    z = [\operatorname{mean}_i h^{(2)}_i \,\|\, g] \\
    (o_{pre}, o_{dec}) = V_2\, \mathrm{ReLU}(V_1 z + c_1) + c_2

with edges following data flow (source kernel -> consumer). Outputs are log-energies:
``prefill_energy_j = exp(o_pre)`` and ``decode_energy_j = (N_gT - 1) * exp(o_dec)`` (``o_dec`` is the
mean energy of one decode step).

Shapes: ``x`` (N, F_node) for all nodes of a PyG batch, ``edge_index`` (2, E), ``batch`` (N,) graph
index of each node, ``global_x`` (G, F_global); returns (G, 2).

:class:`NumpyGNN` evaluates the same weights with NumPy for the server's hot path (no autograd,
no PyG dispatch); ``tests/test_gnn.py`` checks both agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv, global_mean_pool


class LLMCO2GNN(nn.Module):
    def __init__(self, node_features: int, global_features: int, hidden: int = 64, outputs: int = 2):
        super().__init__()
        self.node_features, self.global_features, self.hidden, self.outputs = (
            node_features, global_features, hidden, outputs)
        self.conv1 = SAGEConv(node_features, hidden, aggr="mean")
        self.conv2 = SAGEConv(hidden, hidden, aggr="mean")
        self.lin1 = nn.Linear(hidden + global_features, hidden)
        self.lin2 = nn.Linear(hidden, outputs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.conv1.reset_parameters()
        self.conv2.reset_parameters()
        self.lin1.reset_parameters()
        self.lin2.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, global_x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x, edge_index))
        h = torch.relu(self.conv2(h, edge_index))
        z = torch.cat([global_mean_pool(h, batch, size=global_x.shape[0]), global_x], dim=-1)
        return self.lin2(torch.relu(self.lin1(z)))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(node_features={self.node_features}, "
                f"global_features={self.global_features}, hidden={self.hidden}, outputs={self.outputs})")

    def numpy_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in self.state_dict().items()}


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

    def forward(self, node_x: np.ndarray, adjacency: np.ndarray, global_x: np.ndarray) -> np.ndarray:
        h = np.maximum((adjacency @ node_x) @ self.c1_l + self.c1_lb + node_x @ self.c1_r, 0.0)
        h = np.maximum((adjacency @ h) @ self.c2_l + self.c2_lb + h @ self.c2_r, 0.0)
        z = np.concatenate([h.mean(axis=-2), global_x], axis=-1)
        return np.maximum(z @ self.l1 + self.l1b, 0.0) @ self.l2 + self.l2b
