"""Which local GPUs an engine core's workers run on (vLLM's device assignment, without vLLM).

vLLM (``v1/worker/gpu_worker.py``, 0.32/0.33) gives the worker of TP/PCP/PP local rank ``r`` in
data-parallel replica ``dp_local_rank`` the logical device ``dp_local_rank * W + r`` with
``W = pipeline x prefill-context x tensor parallel`` — when the replica fits on one node and the
workers are started by vLLM's own multiprocessing backend. A replica that spans nodes has only
``W / nodes`` workers (local ranks ``0 .. W/nodes - 1``, no DP offset) on the engine core's
node; the rest of its GPUs cannot be read from here. Ray and external launchers place workers
themselves, so the engine core cannot know which local GPUs are its own.

Indices are *logical* (relative to ``CUDA_VISIBLE_DEVICES``), as the NVML reader takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceSelection", "engine_device_indices"]


@dataclass(frozen=True)
class DeviceSelection:
    """Local devices to read. ``complete``: they are all of the engine's GPUs; ``note``: why not."""

    indices: tuple[int, ...]
    complete: bool
    note: str


def engine_device_indices(*, tensor_parallel: int, pipeline_parallel: int, prefill_context_parallel: int = 1,
                          dp_local_rank: int | None = 0, nnodes_within_dp: int = 1,
                          executor_backend: str | None = "mp") -> DeviceSelection:
    """The local logical devices of one engine core (module docstring)."""
    world = int(tensor_parallel) * int(pipeline_parallel) * int(prefill_context_parallel)
    if world < 1:
        raise ValueError(f"parallel sizes must be >= 1 (TP {tensor_parallel}, PP {pipeline_parallel}, "
                         f"PCP {prefill_context_parallel})")
    if executor_backend in ("ray", "external_launcher"):
        return DeviceSelection((), False, f"workers placed by the {executor_backend} backend: their GPUs "
                                          "are not known to the engine core")
    nodes = max(1, int(nnodes_within_dp))
    if nodes > 1:
        local = world // nodes
        return DeviceSelection(tuple(range(local)), False,
                               f"the replica spans {nodes} nodes: {local} of its {world} GPUs are local")
    rank = int(dp_local_rank or 0)
    return DeviceSelection(tuple(range(rank * world, (rank + 1) * world)), True, "")
