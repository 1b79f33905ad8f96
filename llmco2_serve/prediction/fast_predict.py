"""Per-request predictions as a table lookup: the API server's hot path.

:meth:`Predictor.predict_many` costs ~0.3 ms of NumPy per call (graph features, GNN forward).
Under load vLLM's API process is CPU-bound, so that cost came straight off its throughput
(issue 10: 0.64x with one-token requests). The prediction depends on three integers only (batch
``b``, prompt tokens ``L``, generated tokens ``G``) for a given deployment, so
:class:`PredictionTable` evaluates the GNN once, at start-up, on a grid and answers each request
with pure-Python interpolation (no NumPy, a few microseconds).

Grid: in each dimension the integers ``round(2 ** (i / k))`` (``k`` = ``points_per_doubling``)
from 1 to the maximum, plus 1, 2 and the maximum themselves. With the default ``k = 4`` every
batch size up to 8 and every length up to 8 is a node; neighbouring nodes are at most ~19 %
apart further up. The prompt axis also has nodes on both sides of the first eight steps of the
flash-attention tile count (:func:`tile_nodes`), where the prefill cost jumps.

Tabulated, per sequence of the batch (the request's share, 1/b of the batch's value):

* ``ln`` prefill energy and ``ln`` prefill time;
* ``ln`` decode energy and ``ln`` decode time **per decode step** (the phase total divided by
  the ``G - 1`` decode steps), multiplied back by ``G - 1`` after interpolation, so the decode
  phase is exactly zero for one-token requests and grows linearly with ``G`` as the model's
  per-step structure does.

Interpolation is trilinear in ``(ln b, ln L, ln G)`` on those logarithms (energies follow power
laws in the three inputs far better than straight lines). On a node it returns the GNN's value
(up to rounding); between nodes the error against :meth:`Predictor.predict_many` is measured at
build time on random points (:attr:`PredictionTable.max_rel_error`, logged by the service,
bounded in ``tests/test_fast_predict.py``, printed by ``benchmarks/predict_overhead.py``).
CO2 is computed from the interpolated energy and time with the predictor's own factors, exactly as
``predict_many`` does.

Points outside the grid are not extrapolated: :meth:`PredictionTable.covers` says no and the
caller predicts directly.
"""

from __future__ import annotations

import array
import math
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmco2_serve.workload.graph import FLASH_QUERY_TILE

__all__ = ["PredictionTable", "Share", "log_grid", "measure_error", "tile_nodes"]

_LOG = math.log
_EXP = math.exp


def log_grid(max_value: int, points_per_doubling: int) -> list[int]:
    """Sorted integer nodes ``round(2 ** (i / k))`` from 1 to ``max_value`` (both included), and 2."""
    if isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 1:
        raise ValueError(f"max_value must be an int >= 1, got {max_value!r}")
    if isinstance(points_per_doubling, bool) or not isinstance(points_per_doubling, int) or points_per_doubling < 1:
        raise ValueError(f"points_per_doubling must be an int >= 1, got {points_per_doubling!r}")
    k = points_per_doubling
    nodes = {1, max_value}
    if max_value >= 2:
        nodes.add(2)
    n = math.ceil(math.log2(max_value) * k)
    for i in range(n + 1):
        nodes.add(min(max_value, max(1, round(2 ** (i / k)))))
    return sorted(nodes)


# The kernel graph's flash-attention prefill reads its cached keys once per query tile
# (FLASH_QUERY_TILE, 128), so a prefill's cost steps where the tile count does, at
# 128 j + 1 tokens. Nodes on both sides of the first steps keep the interpolation from smearing a
# step over a log-grid interval; further up a step is a small share of the prefill.
_TILE = FLASH_QUERY_TILE
_TILE_STEPS = 8


def tile_nodes(max_prompt_len: int) -> list[int]:
    """Prompt-length nodes on both sides of the first flash-attention tile steps."""
    return [n for j in range(1, _TILE_STEPS + 1) for n in (_TILE * j, _TILE * j + 1) if n <= max_prompt_len]


@dataclass(frozen=True)
class Share:
    """One request's share of its batch: energies (J), times (s), CO2 (g CO2e)."""

    prefill_energy_j: float
    decode_energy_j: float
    prefill_time_s: float
    decode_time_s: float
    co2_g: float

    @property
    def energy_j(self) -> float:
        return self.prefill_energy_j + self.decode_energy_j

    @property
    def time_s(self) -> float:
        return self.prefill_time_s + self.decode_time_s


class _Axis:
    """Nodes of one dimension and their logarithms, and where a value falls between them."""

    __slots__ = ("nodes", "ln", "last", "max")

    def __init__(self, nodes: Sequence[int]) -> None:
        self.nodes = list(nodes)
        self.ln = [_LOG(x) for x in self.nodes]
        self.last = len(self.nodes) - 1
        self.max = self.nodes[-1]

    def locate(self, x: int) -> tuple[int, float]:
        """``(i, t)``: ``x`` lies between nodes ``i`` and ``i + 1`` at fraction ``t`` of the log gap."""
        i = bisect_right(self.nodes, x) - 1
        if i >= self.last:  # x == the largest node
            return (self.last - 1, 1.0) if self.last > 0 else (0, 0.0)
        if x == self.nodes[i]:
            return i, 0.0
        ln = self.ln
        return i, (_LOG(x) - ln[i]) / (ln[i + 1] - ln[i])


class PredictionTable:
    """A deployment's predictions over a (batch, prompt, generated) grid (module docstring).

    Args:
        predictor: a :class:`~llmco2_serve.prediction.predictor.Predictor` (needs ``predict_phases``,
            ``co2_g_per_j`` and ``embodied_co2_g_per_s``).
        max_batch, max_prompt_len, max_gen_tokens: the grid's upper corners (inclusive).
        points_per_doubling: grid density (module docstring).
        chunk: rows per ``predict_phases`` call while building (bounds memory).
        check_points: random points compared with ``predict_many`` after the build (0: skip).
        seed: for those points.
    """

    N_VALUES = 4  # ln prefill J, ln decode J per step, ln prefill s, ln decode s per step

    def __init__(self, predictor: Any, *, max_batch: int, max_prompt_len: int, max_gen_tokens: int,
                 points_per_doubling: int = 4, chunk: int = 4096, check_points: int = 256,
                 seed: int = 0) -> None:
        t0 = time.perf_counter()
        self._b = _Axis(log_grid(max_batch, points_per_doubling))
        self._l = _Axis(sorted(set(log_grid(max_prompt_len, points_per_doubling)) | set(tile_nodes(max_prompt_len))))
        self._g = _Axis(log_grid(max_gen_tokens, points_per_doubling))
        self.points_per_doubling = points_per_doubling
        self._co2_per_j = float(predictor.co2_g_per_j)
        self._emb_per_s = float(predictor.embodied_co2_g_per_s)
        nb, nl, ng = len(self._b.nodes), len(self._l.nodes), len(self._g.nodes)
        self._strides = (nl * ng * self.N_VALUES, ng * self.N_VALUES, self.N_VALUES)
        bb, ll, gg = (a.reshape(-1) for a in np.meshgrid(
            np.array(self._b.nodes, np.int64), np.array(self._l.nodes, np.int64),
            np.array(self._g.nodes, np.int64), indexing="ij"))
        values = np.empty((bb.size, self.N_VALUES))
        for s in range(0, bb.size, chunk):
            sl = slice(s, s + chunk)
            b, g = bb[sl].astype(np.float64), gg[sl]
            pre, dec, pre_t, dec_t = predictor.predict_phases(ll[sl], g, b)
            steps = np.maximum(g - 1, 1).astype(np.float64)
            values[sl] = np.stack([pre / b, dec / b / steps, pre_t / b, dec_t / b / steps], axis=-1)
        values = values.reshape(nb, nl, ng, self.N_VALUES)
        if ng > 1:
            # G = 1 has no decode step (zero energy, log undefined); its per-step column is never
            # used for an integer G (it is multiplied by G - 1 = 0), the G = 2 node's keeps ln finite.
            values[:, :, 0, 1] = values[:, :, 1, 1]
            values[:, :, 0, 3] = values[:, :, 1, 3]
        if not np.all(np.isfinite(values)) or not np.all(values > 0):
            bad = int(np.sum(~(np.isfinite(values) & (values > 0))))
            raise ValueError(f"predictor returned {bad} non-finite or non-positive values on the grid")
        self._ln = array.array("d", np.log(values).reshape(-1).tolist())
        self.n_points = int(bb.size)
        self.build_s = time.perf_counter() - t0
        self.max_rel_error = self.p99_rel_error = float("nan")
        if check_points > 0:
            err = measure_error(self, predictor, check_points, seed=seed)
            self.max_rel_error, self.p99_rel_error = err["max"], err["p99"]

    # ------------------------------------------------------------------ hot path
    @property
    def max_batch(self) -> int:
        return self._b.max

    @property
    def max_prompt_len(self) -> int:
        return self._l.max

    @property
    def max_gen_tokens(self) -> int:
        return self._g.max

    def covers(self, batch: int, prompt_len: int, gen_tokens: int) -> bool:
        return (1 <= batch <= self._b.max and 1 <= prompt_len <= self._l.max
                and 1 <= gen_tokens <= self._g.max)

    def _interpolate(self, ib: int, tb: float, il: int, tl: float, g: int) -> tuple[float, float, float, float]:
        ig, tg = self._g.locate(g)
        sb, sl, sg = self._strides
        a = self._ln
        base = ib * sb + il * sl + ig * sg
        v0 = v1 = v2 = v3 = 0.0
        # Corners with zero weight are skipped (most batch sizes and many lengths are nodes).
        for wb, ob in ((1.0 - tb, 0), (tb, sb)):
            if wb == 0.0:
                continue
            for wl, ol in ((1.0 - tl, 0), (tl, sl)):
                w2 = wb * wl
                if w2 == 0.0:
                    continue
                for wg, og in ((1.0 - tg, 0), (tg, sg)):
                    w = w2 * wg
                    if w == 0.0:
                        continue
                    j = base + ob + ol + og
                    v0 += w * a[j]
                    v1 += w * a[j + 1]
                    v2 += w * a[j + 2]
                    v3 += w * a[j + 3]
        steps = g - 1
        return _EXP(v0), _EXP(v1) * steps, _EXP(v2), _EXP(v3) * steps if steps else 0.0

    def shares(self, batch: int, prompt_len: int, gen_tokens: Sequence[int]) -> list[Share]:
        """Shares of one sequence of a ``batch`` of sequences like this one, for each ``gen_tokens``
        (e.g. the expected length and ``max_tokens``). The caller checks :meth:`covers` first."""
        ib, tb = self._b.locate(batch)
        il, tl = self._l.locate(prompt_len)
        out = []
        cj, cs = self._co2_per_j, self._emb_per_s
        for g in gen_tokens:
            pre, dec, pre_t, dec_t = self._interpolate(ib, tb, il, tl, g)
            out.append(Share(pre, dec, pre_t, dec_t, (pre + dec) * cj + (pre_t + dec_t) * cs))
        return out

    def share(self, batch: int, prompt_len: int, gen_tokens: int) -> Share:
        return self.shares(batch, prompt_len, (gen_tokens,))[0]

    def describe(self) -> str:
        return (f"prediction table {len(self._b.nodes)}x{len(self._l.nodes)}x{len(self._g.nodes)} "
                f"(batch <= {self._b.max}, prompt <= {self._l.max}, output <= {self._g.max}), "
                f"built in {self.build_s:.2f} s; vs the GNN: max relative error {self.max_rel_error:.2%}, "
                f"p99 {self.p99_rel_error:.2%}")


def measure_error(table: PredictionTable, predictor: Any, n: int, *, seed: int = 0) -> dict[str, float]:
    """Relative error of the table's total energy and CO2 against ``predictor.predict_many`` on
    ``n`` random points (log-uniform in each dimension, within the grid)."""
    rng = np.random.default_rng(seed)

    def draw(hi: int) -> np.ndarray:
        return np.clip(np.round(np.exp(rng.uniform(0.0, math.log(hi), n))).astype(np.int64), 1, hi)

    b, l, g = draw(table.max_batch), draw(table.max_prompt_len), draw(table.max_gen_tokens)
    errors = []
    for bi in np.unique(b):
        m = b == bi
        exact = predictor.predict_many(l[m], g[m], batch=int(bi))
        for j, (li, gi) in enumerate(zip(l[m].tolist(), g[m].tolist())):
            s = table.share(int(bi), li, gi)
            for got, want in ((s.energy_j, exact.energy_j[j] / bi), (s.co2_g, exact.co2_g[j] / bi),
                              (s.prefill_energy_j, exact.prefill_energy_j[j] / bi)):
                errors.append(abs(got - float(want)) / float(want))
    e = np.array(errors)
    return {"max": float(e.max()), "p99": float(np.percentile(e, 99)), "mean": float(e.mean()), "n": n}
