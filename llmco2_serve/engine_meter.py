"""Engine-core side of the plugin: per-step rows in, per-request measured energy out.

:class:`EngineMeter` feeds an :class:`~llmco2_serve.attribution.EnergyAttributor` from the
scheduler's step boundaries (``hooks/engine_core.py``); it is independent of vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .attribution import EnergyAttributor, MeasuredEnergy, ScheduledWork
from .gpu_energy import EnergyReader

__all__ = ["EngineMeter", "StepRow"]

StepRow = tuple[str, str, int, int]  # (request_id, "prefill"|"decode", n_tokens, context_len before)


_DECODE_CONTEXT_MAX = 1 << 21  # tokens of context the decode-cost table covers (beyond: extrapolated flat)
_DECODE_GRID_POINTS = 160


class EngineMeter:
    """Engine-core side: per-step rows in, per-request measured energy out.

    Call :meth:`step_started` when a step was scheduled (its rows) and :meth:`step_finished`
    with the same key when its compute is done; the step's interval and its work go to the
    attributor. Weights are the predictor's relative step costs (Roofline time of each
    request's new tokens at its context length), or the token count while no predictor is set.
    Not thread-safe except :meth:`set_predictor`: call the rest from the engine's step thread.
    """

    def __init__(self, reader: EnergyReader, predictor: Any = None, *,
                 clock: Callable[[], float] = time.monotonic, **attributor_kwargs: Any) -> None:
        self.reader = reader
        self.predictor: Any = None
        self._clock = clock
        self.attributor = EnergyAttributor(reader, clock, **attributor_kwargs)
        self._open: dict[Any, tuple[float, list[StepRow]]] = {}
        self._decode_table: tuple[np.ndarray, np.ndarray] | None = None
        self.steps = 0
        if predictor is not None:
            self.set_predictor(predictor)

    @property
    def source(self) -> str:
        return self.attributor.source

    def set_predictor(self, predictor: Any) -> None:
        # Decode rows (one token) dominate steps; their cost is piecewise linear in the context, so a
        # table built once replaces a graph evaluation per step (the step loop's hot path).
        grid = np.concatenate([[0.0], np.geomspace(1.0, float(_DECODE_CONTEXT_MAX), _DECODE_GRID_POINTS)])
        costs = np.asarray(predictor.step_costs(np.ones_like(grid), grid), dtype=float).reshape(-1)
        self._decode_table = (grid, costs) if bool(np.all(np.isfinite(costs) & (costs > 0))) else None
        self.predictor = predictor  # one reference swap: safe from another thread

    def weights(self, rows: Sequence[StepRow]) -> list[float]:
        """Relative cost of each row (finite, > 0)."""
        p, table = self.predictor, self._decode_table
        if p is not None and table is not None:
            n = np.fromiter((r[2] for r in rows), float, len(rows))
            ctx = np.fromiter((r[3] for r in rows), float, len(rows))
            c = np.interp(ctx, table[0], table[1])
            multi = n > 1
            if multi.any():
                c[multi] = np.asarray(p.step_costs(n[multi], ctx[multi]), dtype=float).reshape(-1)
            if bool(np.all(np.isfinite(c) & (c > 0))):
                return c.tolist()
        return [float(max(1, r[2])) for r in rows]

    def step_started(self, key: Any, rows: Sequence[StepRow]) -> None:
        """A step was scheduled (``rows``: its work); its compute starts now."""
        if rows:
            self._open[key] = (self._clock(), list(rows))

    def step_finished(self, key: Any) -> None:
        """The step ``key`` finished computing: attribute the energy read now."""
        item = self._open.pop(key, None)
        if item is None:
            self.attributor.poll()
            return
        start, rows = item
        w = self.weights(rows)
        work = [ScheduledWork(r[0], r[1], max(1, int(r[2])), max(0, int(r[3])), wi)  # type: ignore[arg-type]
                for r, wi in zip(rows, w)]
        self.attributor.on_step(start, self._clock(), work)
        self.steps += 1

    def preempted(self, request_id: str) -> None:
        self.attributor.on_preempted(request_id)

    def finished(self, request_id: str, aborted: bool = False) -> MeasuredEnergy:
        return self.attributor.on_finished(request_id, aborted=aborted)

    def close(self) -> None:
        self.reader.close()
