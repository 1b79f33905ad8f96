"""Predicted joules of one engine step, on the scale of the API server's request predictions.

The engine meter weighs a step's rows by Roofline work (seconds at the GPUs' peak rates,
:class:`~llmco2_serve.workload.step_costs.StepCostModel`): a row's own compute and KV reads plus an
even share of the step's weight reads. That is the right *relative* cost inside a step, but it is not
energy, and the online calibrator (``calibration.py``) corrects the GNN's *joules*: a counter window
can only teach it something about the requests' predictions if the window's predicted energy is the
GNN's energy for the same work.

So this module converts Roofline seconds into GNN joules with the GNN itself, per phase, as a
function of the batch (rows per step) and the context, tabulated once at engine start-up (off the
step loop, ~10-50 ms):

* prefill, ``ratio_p(b, L)`` = GNN prefill energy of ``b`` sequences of ``L`` prompt tokens /
  the meter's work of that prefill (``b`` chunks of ``L`` tokens at context 0 and one read of the
  weights);
* decode, ``ratio_d(b, c)`` = GNN decode energy of ``b`` sequences of prompt ``P`` and ``G_ref``
  output tokens / the meter's work of those ``G_ref - 1`` decode steps (``b`` one-token rows at
  contexts ``P .. P + G_ref - 2`` and one read of the weights per step), tabulated at the steps' mean
  context ``c = P + (G_ref - 2) / 2``. ``G_ref = 128``, a typical chat answer: the GNN's per-step
  decode energy still depends a little on the request's output length beyond the context it
  implies (a learnt effect: the ``vllm`` profile was trained on outputs of hundreds to thousands of
  tokens), so the reference sits in the middle of what requests generate (with 32: up to 8 % off for
  400-token answers; with 128: within 5 % from 16 to 400 tokens).

A step's predicted energy is then ``sum_rows weight x ratio(phase)``: its decode rows at the step's
rows and their mean context, each prefill chunk at the step's rows and its end position. For ``b``
requests of one shape running together this reproduces the service's per-request prediction
``GNN(b, L, G) / b`` up to how far the GNN's per-step decode energy depends on ``G`` beyond the mean
context (``tests/test_window_observations.py`` measures it; the README quotes it). Interpolation is
bilinear in ``(ln b, ln c)`` on ``ln ratio``, held at the grid's edges (no extrapolation).

Imports without vLLM. Pure Python on the lookup path (a few microseconds per step, on the engine's
poller thread, never on the step thread).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["StepEnergyScale"]

_G_REF = 128  # output tokens of the decode reference request (127 decode steps; see below)


def _axis(max_value: int, per_doubling: int = 2) -> list[int]:
    nodes = {1, int(max_value)}
    n = math.ceil(math.log2(max(2, max_value)) * per_doubling)
    for i in range(n + 1):
        nodes.add(min(int(max_value), max(1, round(2 ** (i / per_doubling)))))
    return sorted(nodes)


class _Grid2:
    """Bilinear interpolation of a value tabulated on (ln x, ln y) nodes, held at the edges."""

    __slots__ = ("_lx", "_ly", "_v", "_nx", "_ny")

    def __init__(self, xs: Sequence[float], ys: Sequence[float], values: np.ndarray) -> None:
        self._lx = [math.log(float(x)) for x in xs]
        self._ly = [math.log(float(y)) for y in ys]
        self._v = [list(map(float, row)) for row in np.asarray(values, dtype=np.float64)]
        self._nx, self._ny = len(self._lx), len(self._ly)

    @staticmethod
    def _locate(nodes: list[float], n: int, v: float) -> tuple[int, float]:
        if v <= nodes[0]:
            return 0, 0.0
        if v >= nodes[-1]:
            return n - 2 if n > 1 else 0, 1.0 if n > 1 else 0.0
        i = bisect_right(nodes, v) - 1
        return i, (v - nodes[i]) / (nodes[i + 1] - nodes[i])

    def __call__(self, x: float, y: float) -> float:
        i, fx = self._locate(self._lx, self._nx, math.log(x if x > 1.0 else 1.0))
        j, fy = self._locate(self._ly, self._ny, math.log(y if y > 1.0 else 1.0))
        v = self._v
        i1 = i + 1 if self._nx > 1 else i
        j1 = j + 1 if self._ny > 1 else j
        a = v[i][j] + (v[i][j1] - v[i][j]) * fy
        b = v[i1][j] + (v[i1][j1] - v[i1][j]) * fy
        return a + (b - a) * fx


class StepEnergyScale:
    """GNN joules per second of the engine meter's Roofline row weights (module docstring).

    Args:
        batches, prompts, contexts: the grid's axes (rows per step; prefill length; mean decode context).
        log_ratio_prefill: ln J/s on (batches x prompts); log_ratio_decode: on (batches x contexts).
        g_ref: output tokens of the decode reference request.
    """

    def __init__(self, batches: Sequence[int], prompts: Sequence[int], contexts: Sequence[float],
                 log_ratio_prefill: np.ndarray, log_ratio_decode: np.ndarray, g_ref: int = _G_REF) -> None:
        lp = np.asarray(log_ratio_prefill, dtype=np.float64)
        ld = np.asarray(log_ratio_decode, dtype=np.float64)
        if lp.shape != (len(batches), len(prompts)) or ld.shape != (len(batches), len(contexts)):
            raise ValueError("ratio tables do not match their axes")
        if not (np.isfinite(lp).all() and np.isfinite(ld).all()):
            raise ValueError("ratio tables must be finite")
        self.batches = list(batches)
        self.prompts = list(prompts)
        self.contexts = list(contexts)
        self.g_ref = int(g_ref)
        self._p = _Grid2(batches, prompts, lp)
        self._d = _Grid2(batches, contexts, ld)

    @classmethod
    def from_predictor(cls, predictor: Any, costs: Any = None, *, max_batch: int = 1024,
                       max_context: int = 32768, g_ref: int = _G_REF) -> "StepEnergyScale":
        """Tabulate the ratios with ``predictor`` (``predict_phases``) and its step costs (default:
        :meth:`StepCostModel.from_predictor`)."""
        if costs is None:
            from llmco2_serve.workload.step_costs import StepCostModel

            costs = StepCostModel.from_predictor(predictor)
        batches = _axis(max_batch)
        prompts = _axis(max_context)
        b = np.repeat(np.asarray(batches, np.float64), len(prompts))
        plen = np.tile(np.asarray(prompts, np.float64), len(batches))
        g = np.full_like(plen, float(g_ref))
        pre_j, dec_j, _, _ = predictor.predict_phases(plen.astype(np.int64), g.astype(np.int64), b.astype(np.int64))
        pre_j = np.asarray(pre_j, np.float64).reshape(-1)
        dec_j = np.asarray(dec_j, np.float64).reshape(-1)
        # The meter's work of the same prefill and decode (engine_meter.EngineMeter._weights_cols).
        own_p = np.array([costs.chunk_parts_s(int(p), 0)[0] for p in prompts])
        shared_p = np.array([costs.shared_step_s(float(bb) * float(p)) for bb in batches for p in prompts])
        work_p = b * np.tile(own_p, len(batches)) + shared_p
        steps = g_ref - 1
        ctx = np.asarray(prompts, np.float64)[:, None] + np.arange(steps, dtype=np.float64)[None, :]
        own_d = np.asarray(costs.decode_row_parts_s(ctx)[0], np.float64).sum(axis=1)  # per prompt
        shared_d = np.array([costs.shared_step_s(float(bb)) for bb in batches])
        work_d = b * np.tile(own_d, len(batches)) + steps * np.repeat(shared_d, len(prompts))
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = np.log(pre_j / work_p).reshape(len(batches), len(prompts))
            ld = np.log(dec_j / work_d).reshape(len(batches), len(prompts))
        contexts = [p + (steps - 1) / 2.0 for p in prompts]
        return cls(batches, prompts, contexts, lp, ld, g_ref)

    def prefill_j_per_s(self, rows: float, prompt_len: float) -> float:
        return math.exp(self._p(rows, prompt_len))

    def decode_j_per_s(self, rows: float, mean_context: float) -> float:
        return math.exp(self._d(rows, mean_context))

    def step_j(self, is_prefill: Sequence[bool], weights: np.ndarray, n_tokens: np.ndarray,
               context: np.ndarray) -> tuple[float, float]:
        """(prefill J, decode J) of one step from its rows: phase flags, the meter's weights
        (seconds), new tokens and context before the step (arrays)."""
        rows = len(is_prefill)
        if not rows:
            return 0.0, 0.0
        if True not in is_prefill:
            return 0.0, float(weights.sum()) * math.exp(self._d(rows, float(context.mean())))
        pre = [i for i, p in enumerate(is_prefill) if p]
        prefill_j = w_p = ctx_p = 0.0
        for i in pre:
            wi, ci = float(weights[i]), float(context[i])
            w_p += wi
            ctx_p += ci
            prefill_j += wi * math.exp(self._p(rows, ci + float(n_tokens[i])))
        n_d = rows - len(pre)
        if not n_d:
            return prefill_j, 0.0
        w_d = float(weights.sum()) - w_p
        return prefill_j, w_d * math.exp(self._d(rows, (float(context.sum()) - ctx_p) / n_d))
