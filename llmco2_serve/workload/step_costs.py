"""Relative cost of the rows of one engine step: a shared part read once per step, own parts per row.

Splitting a measured step's energy between the requests in it needs each row's share. A batch-1
Roofline time per row (what the attributor used before) charges every decode row a full read of
the weights, so a 512-token prefill chunk next to 32 decode rows got ~5% of the step. In a real
step the weights are read once for the whole batch; what differs per row is its own compute
(its tokens through every linear layer, its attention pairs) and its own KV-cache reads.

So a step of rows ``i`` costs (seconds at the GPU's peak rates, i.e. proportional to energy at a
roughly constant power)::

    shared_s = layers * sum_nodes(weight_bytes / bw) + LM-head weights / bw (+ MoE experts loaded)
    own_s(i) = layers * sum_nodes(ops_i / peak + activation_and_kv_bytes_i / bw) + LM-head ops_i / peak

and row ``i`` is weighted ``own_s(i) + shared_s / n_rows``: the shared part evenly, own parts as
they are. Both come from the same per-node coefficients as the kernel graph (``graph.py``): the
segment quantities are ``[tokens, attention pairs, KV rows read, passes, expert passes]``; the
``passes`` column is the weight read of a pass (shared), the first three are the row's own.

Decode rows (one token) are the hot path: :meth:`StepCostModel.decode_row_s` is pure Python;
multi-token rows (prefill chunks, speculative decode) go through :meth:`rows_s` (NumPy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmco2_serve.workload.graph import FLASH_QUERY_TILE as _FLASH_QUERY_TILE
from llmco2_serve.workload.graph import KIND_INDEX, Segment

__all__ = ["StepCostModel"]


@dataclass(frozen=True)
class StepCostModel:
    """Per-row own costs and the per-step shared cost, seconds (see the module docstring).

    Attributes:
        own_coef_s: (3,) seconds per token, per attention pair, per KV row read, all layers.
        head_row_s: LM-head compute of one pass (one sampled position per row), seconds.
        shared_s: weight reads of one step (all layers and the LM head), seconds.
        expert_pass_s: seconds per expected expert loaded per layer pass (MoE), 0 for dense.
        window: sliding window (tokens) or None; window_fraction: share of layers that use it.
    """

    own_coef_s: tuple[float, float, float]
    own_compute_coef_s: tuple[float, float, float]
    head_row_s: float
    shared_s: float
    expert_pass_s: float
    num_experts: int
    experts_per_token: int
    window: int | None
    window_fraction: float
    unfused_attention: bool
    _template: Any

    @classmethod
    def from_predictor(cls, predictor: Any) -> "StepCostModel":
        t = predictor._template  # the kernel graph of one layer (same package, stable interface)
        arch = predictor.arch
        layers = float(arch.num_layers)
        is_ar = t.kind_onehot[:, KIND_INDEX["all_reduce"]] > 0
        # per node, per unit of each segment quantity: compute time + memory/network time
        mem_s = np.where(is_ar, t.coef_net / t.network_bandwidth_bytes_per_s,
                         t.coef_mem / t.memory_bandwidth_bytes_per_s)
        compute_var_s = layers * (t.coef_ops / t.peak_ops_per_s).sum(axis=1)  # (5,)
        per_var_s = compute_var_s + layers * mem_s.sum(axis=1)
        one = Segment.chunk(1, np.array([1.0]), np.array([0.0]))
        _, head_mem, _, head_matmul = t.head_costs(one)
        tp = float(predictor.parallelism.tensor_parallel)
        head_row_s = float(np.asarray(head_matmul).reshape(-1)[0]) / t.peak_ops_per_s / tp
        head_weights_s = float(np.asarray(head_mem).reshape(-1)[0]) / (t.memory_bandwidth_bytes_per_s * tp)
        return cls(
            own_coef_s=(float(per_var_s[0]), float(per_var_s[1]), float(per_var_s[2])),
            own_compute_coef_s=(float(compute_var_s[0]), float(compute_var_s[1]), float(compute_var_s[2])),
            head_row_s=head_row_s,
            shared_s=float(per_var_s[3]) + head_weights_s,
            expert_pass_s=float(per_var_s[4]),
            num_experts=int(arch.moe_num_experts or 0) if arch.is_moe else 0,
            experts_per_token=int(arch.moe_experts_per_token or 0) if arch.is_moe else 0,
            window=int(arch.sliding_window) if arch.sliding_window else None,
            window_fraction=float(arch.sliding_window_layer_fraction) if arch.sliding_window else 0.0,
            unfused_attention=t.attention == "unfused",
            _template=t,
        )

    def _decode_keys(self, context_len: Any) -> Any:
        """Keys a decode token attends to after ``context_len`` cached tokens (float or array):
        ``context + 1``, capped at the window on the windowed share of layers."""
        keys = context_len + 1.0
        w = self.window
        if w is None:
            return keys
        f = self.window_fraction
        if isinstance(keys, np.ndarray):
            return np.where(keys > w, (1.0 - f) * keys + f * w, keys)
        return (1.0 - f) * keys + f * w if keys > w else keys

    def decode_row_parts_s(self, context_len: Any) -> tuple[Any, Any]:
        """(own cost, its compute part) of one decode token after ``context_len`` cached tokens;
        pure Python for a number, vectorised for an array of contexts."""
        keys = self._decode_keys(context_len)
        c_tok, c_pair, c_kv = self.own_coef_s
        k_tok, k_pair, k_kv = self.own_compute_coef_s
        return (c_tok + (c_pair + c_kv) * keys + self.head_row_s,
                k_tok + (k_pair + k_kv) * keys + self.head_row_s)

    def decode_row_s(self, context_len: int) -> float:
        """Own cost of one decode token after ``context_len`` cached tokens (pure Python)."""
        return self.decode_row_parts_s(context_len)[0]

    def chunk_parts_s(self, n: int, context_len: int) -> tuple[float, float]:
        """(own cost, its compute part) of a row of ``n`` tokens after ``context_len`` cached ones,
        in pure Python (the engine's step loop): the segment quantities of ``graph.py`` for one
        pass of one sequence, equal to :meth:`rows_s` / :meth:`rows_compute_s`."""
        c = float(context_len)
        t = float(n)
        pairs = t * c + t * (t + 1.0) * 0.5
        w = self.window
        f = self.window_fraction
        if w is not None and f:
            def upto(x: float) -> float:
                return x * (x + 1.0) * 0.5 if x <= w else w * (w + 1.0) * 0.5 + (x - w) * w
            pairs = (1.0 - f) * pairs + f * (upto(c + t) - upto(c))
        if t <= 1.0:
            kv = pairs  # one query per pass reads each key it attends to once
        elif self.unfused_attention:
            pairs = t * (c + t)  # the whole (masked) score rectangle
            kv = c + t
        else:
            q = float(_FLASH_QUERY_TILE)
            tiles = math.ceil(t / q)
            kv = (tiles - 1) * c + q * (tiles - 1) * tiles * 0.5 + (c + t)
            if w is not None:
                kv = (1.0 - f) * kv + f * min(kv, tiles * (w + q))
        c_tok, c_pair, c_kv = self.own_coef_s
        k_tok, k_pair, k_kv = self.own_compute_coef_s
        return (c_tok * t + c_pair * pairs + c_kv * kv + self.head_row_s,
                k_tok * t + k_pair * pairs + k_kv * kv + self.head_row_s)

    def _own_vars(self, new_tokens: Any, context_len: Any) -> np.ndarray:
        """(R, 3) tokens, attention pairs and KV rows of rows of one sequence and one pass."""
        seg = Segment.chunk(1, np.asarray(new_tokens, float), np.asarray(context_len, float))
        return np.atleast_2d(self._template._segment_vars(seg))[:, :3]

    def rows_compute_s(self, new_tokens: Any, context_len: Any) -> np.ndarray:
        """The compute part (ops at peak) of :meth:`rows_s`; the rest is memory traffic."""
        return self._own_vars(new_tokens, context_len) @ np.asarray(self.own_compute_coef_s) + self.head_row_s

    def rows_s(self, new_tokens: Any, context_len: Any) -> np.ndarray:
        """Own cost of rows of any size (prefill chunks too), shape of the broadcast inputs."""
        return self._own_vars(new_tokens, context_len) @ np.asarray(self.own_coef_s) + self.head_row_s

    def shared_step_s(self, total_tokens: float) -> float:
        """Weight reads of one step carrying ``total_tokens`` tokens (MoE: experts they route to)."""
        s = self.shared_s
        if self.num_experts and self.expert_pass_s:
            e = float(self.num_experts)
            s += self.expert_pass_s * e * (1.0 - (1.0 - self.experts_per_token / e) ** total_tokens)
        return s
