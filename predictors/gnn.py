r"""The LLMCO2 energy GNN (paper section 4.1): two GraphSAGE layers, global features, two linear layers.

.. math::

    h^{(1)}_i = \mathrm{ReLU}(W_1 x_i + U_1 \operatorname{mean}_{j \to i} x_j + b_1) \\
    h^{(2)}_i = \mathrm{ReLU}(W_2 h^{(1)}_i + U_2 \operatorname{mean}_{j \to i} h^{(1)}_j + b_2) \\
    z = [\operatorname{mean}_i h^{(2)}_i \,\|\, g] \\
    (o_{pre}, o_{dec}) = V_2\, \mathrm{ReLU}(V_1 z + c_1) + c_2

with edges following data flow (source kernel -> consumer). With an ``offset`` (a fixed function of
the global features, :func:`~.features.roofline_offset`: the Roofline energy of the kernels at the
GPUs' TDP) the network adds it to its outputs, so that it learns the log of measured over Roofline
energy -- a quantity that moves far less with batch, model size and GPU than the energy itself, so a
held-out model family inherits the batch physics of the Roofline (weights read once per step and
shared by the batch, per-row KV reads and compute) instead of extrapolating a learned curve.
Outputs are log-energies:
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

from .gnn_numpy import OFFSET_KEYS, NumpyGNN, mean_adjacency  # noqa: F401  (re-exported)


class LLMCO2GNN(nn.Module):
    def __init__(self, node_features: int, global_features: int, hidden: int = 64, outputs: int = 2,
                 offset: dict | None = None):
        super().__init__()
        self.node_features, self.global_features, self.hidden, self.outputs = (
            node_features, global_features, hidden, outputs)
        self.conv1 = SAGEConv(node_features, hidden, aggr="mean")
        self.conv2 = SAGEConv(hidden, hidden, aggr="mean")
        self.lin1 = nn.Linear(hidden + global_features, hidden)
        self.lin2 = nn.Linear(hidden, outputs)
        self.has_offset = offset is not None
        if offset is not None:  # fixed (buffers, not parameters): saved with the weights, never trained
            for key in OFFSET_KEYS:
                self.register_buffer(key, torch.as_tensor(np.asarray(offset[key], np.float64), dtype=torch.float32))
        self.reset_parameters()

    @classmethod
    def from_numpy_weights(cls, weights: dict, node_features: int, global_features: int) -> "LLMCO2GNN":
        """The module of :meth:`numpy_weights` output (with its offset, if the weights have one)."""
        if "lin2.weight" not in weights:
            raise KeyError("weights lack ['lin2.weight']: not LLMCO2GNN weights")
        hidden, outputs = (int(v) for v in np.asarray(weights["lin2.weight"]).shape[::-1])
        present = [k for k in OFFSET_KEYS if k in weights]
        if present and len(present) != len(OFFSET_KEYS):
            raise KeyError(f"weights lack {sorted(set(OFFSET_KEYS) - set(present))}: not LLMCO2GNN weights")
        offset = {k: weights[k] for k in OFFSET_KEYS} if present else None
        model = cls(node_features, global_features, hidden=hidden, outputs=outputs, offset=offset)
        state = model.state_dict()
        missing = set(state) - set(weights)
        if missing:
            raise KeyError(f"weights lack {sorted(missing)}: not LLMCO2GNN weights")
        model.load_state_dict({k: torch.tensor(np.asarray(weights[k]), dtype=torch.float32) for k in state})
        return model

    def log_offset(self, global_x: Tensor) -> Tensor:
        """The fixed offset of :func:`~.gnn_numpy.log_offset` (zeros without one)."""
        if not self.has_offset:
            return global_x.new_zeros((global_x.shape[0], self.outputs))
        raw = global_x[:, self.offset_idx.long()] * self.offset_std + self.offset_mean
        terms = torch.log(torch.expm1(raw).clamp_min(1e-30)) @ self.offset_coef + self.offset_bias
        out = self.offset_out.long()
        return torch.stack([torch.logsumexp(terms[:, out == o], dim=-1) for o in range(self.outputs)], dim=-1)

    def reset_parameters(self) -> None:
        self.conv1.reset_parameters()
        self.conv2.reset_parameters()
        self.lin1.reset_parameters()
        self.lin2.reset_parameters()

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, global_x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x, edge_index))
        h = torch.relu(self.conv2(h, edge_index))
        z = torch.cat([global_mean_pool(h, batch, size=global_x.shape[0]), global_x], dim=-1)
        out = self.lin2(torch.relu(self.lin1(z)))
        return out + self.log_offset(global_x) if self.has_offset else out

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(node_features={self.node_features}, "
                f"global_features={self.global_features}, hidden={self.hidden}, outputs={self.outputs}"
                + (", offset=roofline)" if self.has_offset else ")"))

    def numpy_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in self.state_dict().items()}
