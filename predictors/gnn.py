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

:class:`~.gnn_numpy.NumpyGNN` evaluates the same weights with NumPy for the server's hot path (no
torch import, no autograd, no PyG dispatch); ``tests/test_gnn.py`` checks both agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv, global_mean_pool

from .gnn_numpy import NumpyGNN, mean_adjacency  # noqa: F401  (re-exported)


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
