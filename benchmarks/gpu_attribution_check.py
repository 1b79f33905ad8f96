"""Check EngineMeter against the real NVML counter with engine-like GPU work of independently known cost.

Run (GPU machine: torch with CUDA, nvidia-ml-py, numpy; no vLLM and no pip install needed)::

    python3 benchmarks/gpu_attribution_check.py --out $OUT   # ~2.5-3 min on an H100/H200, ~28 GB

    python benchmarks/gpu_attribution_check.py --dry-run     # CPU: simulated GPU, ~5 s (70 s simulated)

The GPU run stops admitting work and aborts what runs so as to end within ``--max-runtime-s`` (330),
and rewrites ``report.json`` with the raw results after each phase, so a late failure or a kill
keeps what was measured.

What runs on the GPU (bf16, shapes of Llama-3.1-8B, the config the meter's predictor is built from)
    A synthetic engine *step* is one shared weight read plus one piece of work per row:

    - ``shared``: GEMVs over weight matrices as large as the model's layer + LM-head weights
      (~15 GB in 7 matrices), read once per step whatever the batch (memory-bound, like the weight reads of a
      decode step);
    - prefill chunk ``(n, c)``: ``n`` tokens through ``reps`` GEMMs ``[n, hidden] @ [hidden, ffn]``
      (2 x layer parameters FLOPs per token: compute-bound) plus two attention GEMMs against the
      request's own KV buffer of ``c + n`` tokens;
    - decode row ``kv=L``: a GEMV over the request's own KV buffer, ``L`` tokens x (layers x 2 x
      kv_heads x head_dim) bf16 (memory-bound, growing with the context). ``L`` is the context
      rounded up to a ``--kv-block`` (256) multiple so that there are few distinct kinds; the
      meter is told the context the work really reads (``context_len = L - 1``).

    Compute-bound prefill, memory-bound decode and the shared read draw different power, and none
    of it is proportional to the meter's row weights (Roofline seconds at peak rates): e.g. the
    meter charges every decode row a token's worth of GEMM compute that the synthetic decode row
    (like a real one, whose compute rides on the shared weight read) does not do.

The engine loop (what EngineMeter sees; vLLM 0.32 async scheduling)
    Requests (prompt 256/512/1024/1536 tokens, output 8-640 tokens, ~12% client aborts, a
    quarter of them right after the first prefill chunk) are admitted closed-loop towards a concurrency target that swings between
    ``min_running`` and ``max_running``. Each step holds one prefill chunk (at most 512 tokens,
    chunked prefill) when one is waiting, plus one decode row per running request: mixed batches.
    Step N+1 is scheduled (``step_started``) and launched *before* the loop waits for step N
    (``step_finished``), so a request whose last token comes out of step N is already in step
    N+1: its ``finished()`` comes while a step holding it is in flight, and that extra row runs
    on the GPU. Phases: ~1 s of start-up idle, a busy spell, an idle spell (engine drained, the
    poller calls ``idle_tick()`` at 10 Hz), a second busy spell, then idle ticks until every
    finished request has its final value (``pop_final``).

Ground truth, independent of the meter
    Before the engine phase (pass A) and after it (pass B, reverse order), every distinct kind
    of work (``shared``, each prefill ``(n, c)``, each decode ``kv=L``) runs ALONE, back to back
    (batches of ~5 ms, two in flight, decode/prefill cycling over the request KV buffers so that
    nothing is served from L2), for a window of at least ``--alone-s`` seconds that starts and ends
    at a counter change. Per execution: ``E_exec = dE / n`` (J, everything the board drew, idle
    power included), ``tau = window / n`` (s) and ``E_dyn = E_exec - P_idle * tau`` with
    ``P_idle`` the counter's slope over ``--idle-s`` (>= 2 s) of idle at the start.

    A request's truth = sum over every row it had in a step that ran (the extra row after its
    last token, and rows of an aborted request's in-flight step, included) of ``E_exec`` of that
    row's kind, plus, per step, ``E_exec(shared) / rows in the step`` (the shared read split
    equally among the step's rows). Each row's part goes to its phase (prefill / decode). This
    is the *total* truth: it includes the static (idle-level) power over the time its work held
    the GPU, as the meter does (the meter gives a step all of its window's energy and only time
    with no step to idle). The *dynamic* view compares ``sum E_dyn`` with the meter's value minus
    ``P_idle x`` the request's alone-measured busy time. Additivity (the sum of all truths vs
    the energy the meter gave to requests) says how well alone costs add up in a batch; the
    *split-only* view rescales the truths to the meter's sum to separate the split error from it.

Report (``report.json`` and ``report.txt`` in ``--out``, default ``$OUT`` else ``./gpu-check-out``)
    Per request: meter final value vs truth; median and p90 relative error for total, prefill,
    decode (and split-only, dynamic, first answers); uncertainty coverage (share with |err| <=
    uncertainty_j); conservation (sum of finals + idle + unreported vs the counters' total
    and the raw counter delta of the meter's reader); the counter's update period (tight read
    loop for ~1 s while idle; and at ~5 ms resolution under load); idle power; per kind the
    alone energy, time, power and J per meter-model (Roofline) second.

``--dry-run`` runs the same code with a simulated GPU: the same torch kernels on tiny CPU tensors
(so the torch code paths run), while time (a ``ManualClock``) and energy (``FakeEnergyReader``
over a power model of its own, documented at ``SimGpuModel``) come from full-size shapes. It never
imports vLLM, and the GPU run needs no vLLM either.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
try:
    import llmco2_serve.predictors  # noqa: F401  (installed: hooks/ and predictors/ mapped in)
except ImportError:  # a plain checkout (the GPU machine): map predictors/ the way pyproject does
    sys.path.insert(0, str(_ROOT))
    import llmco2_serve

    if str(_ROOT) not in llmco2_serve.__path__:
        llmco2_serve.__path__.append(str(_ROOT))  # llmco2_serve.predictors -> <repo>/predictors

from llmco2_serve.runtime.engine_meter import EngineMeter  # noqa: E402
from llmco2_serve.hardware.gpu_energy import (  # noqa: E402
    EnergyReaderError,
    FakeEnergyReader,
    ManualClock,
    NvmlEnergyReader,
)
from llmco2_serve.prediction.predictor import Predictor  # noqa: E402
from llmco2_serve.workload.step_costs import StepCostModel  # noqa: E402

# A counter that does not change for this long while polled under load is broken: stop, not hang.
_STALL_S = 5.0
_IDLE_TICK_S = 0.1  # the production idle poller's period (hooks/engine_core.py)

#: The model the synthetic work follows and the meter's predictor is built from (Llama-3.1-8B).
MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "torch_dtype": "bfloat16", "architectures": ["LlamaForCausalLM"], "_name_or_path": "llama-3.1-8b-shapes",
}


# --------------------------------------------------------------------------------------------
# Shapes of the synthetic work
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """Tensor sizes of the synthetic work (elements; bf16 = 2 bytes each).

    ``shared_rows x hidden``: the shared weight matrix (layer weights + LM head);
    ``prefill_reps`` GEMMs ``[n, hidden] @ [hidden, ffn]`` per prefill chunk (2 x layer params
    FLOPs per token); ``kv_width``: KV elements per token over all layers (K and V).
    """

    hidden: int
    ffn: int
    kv_width: int
    shared_rows: int
    prefill_reps: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Shapes":
        h, f = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        kvh = int(cfg.get("num_key_value_heads", heads))
        hd = h // heads
        layer_params = h * heads * hd + 2 * h * kvh * hd + heads * hd * h + 3 * h * f
        shared = layers * layer_params + int(cfg["vocab_size"]) * h
        return cls(hidden=h, ffn=f, kv_width=layers * 2 * kvh * hd,
                   shared_rows=math.ceil(shared / h), prefill_reps=max(1, round(layers * layer_params / (h * f))))

    @property
    def shared_bytes(self) -> float:
        return 2.0 * self.shared_rows * self.hidden

    def prefill_gemm_flops(self, n: int) -> float:
        return 2.0 * self.prefill_reps * n * self.hidden * self.ffn

    def prefill_attention_flops(self, n: int, c: int) -> float:
        return 2.0 * 2.0 * n * (c + n) * self.kv_width  # S = Q K^T, then S K

    def kv_bytes(self, tokens: int) -> float:
        return 2.0 * tokens * self.kv_width


#: Tensor sizes the dry run really allocates and runs on the CPU (the code paths, not the cost).
TINY_SHAPES = Shapes(hidden=64, ffn=96, kv_width=32, shared_rows=256, prefill_reps=3)


@dataclass(frozen=True)
class Kind:
    """One distinct kind of work: ``shared``, ``prefill`` (n tokens after c) or ``decode`` (kv L)."""

    key: str
    phase: str | None  # None for the shared read
    n_tokens: int = 0
    context: int = 0  # prefill: tokens before the chunk; decode: L - 1
    kv_len: int = 0  # decode: KV tokens read

    @staticmethod
    def shared() -> "Kind":
        return Kind("shared", None)

    @staticmethod
    def prefill(n: int, c: int) -> "Kind":
        return Kind(f"prefill n={n} c={c}", "prefill", n, c, c + n)

    @staticmethod
    def decode(kv_len: int) -> "Kind":
        return Kind(f"decode kv={kv_len}", "decode", 1, kv_len - 1, kv_len)


@dataclass(frozen=True)
class Workload:
    """The request mix and the engine's limits (tokens unless named)."""

    prompts: tuple[int, ...] = (256, 512, 1024, 1536)
    prompt_weights: tuple[float, ...] = (0.3, 0.3, 0.25, 0.15)
    chunk: int = 512
    out_min: int = 8
    out_max: int = 640
    kv_block: int = 256
    abort_frac: float = 0.12
    min_running: int = 4
    max_running: int = 40
    wave_s: float = 12.0  # period of the concurrency target's swing

    def kv_bucket(self, tokens: int) -> int:
        return -(-tokens // self.kv_block) * self.kv_block

    @property
    def max_kv(self) -> int:
        # decode row j of a request reads prompt + j + 1 tokens; j <= out - 1 (one extra row)
        return self.kv_bucket(max(self.prompts) + self.out_max)

    def chunks(self, prompt: int) -> list[tuple[int, int]]:
        return [(min(self.chunk, prompt - c), c) for c in range(0, prompt, self.chunk)]

    def kinds(self) -> list[Kind]:
        out = [Kind.shared()]
        pre = sorted({ch for p in self.prompts for ch in self.chunks(p)}, key=lambda x: (x[1], x[0]))
        out += [Kind.prefill(n, c) for n, c in pre]
        lo = self.kv_bucket(min(self.prompts) + 1)
        out += [Kind.decode(L) for L in range(lo, self.max_kv + 1, self.kv_block)]
        return out


# --------------------------------------------------------------------------------------------
# Kernels: the same torch code on the GPU and (tiny) on the CPU
# --------------------------------------------------------------------------------------------
class Kernels:
    """The synthetic work as torch ops on ``device`` (outputs are discarded: the cost is the point)."""

    #: Largest matrix (elements) in one kernel: the shared read is split into several GEMVs (as a
    #: model's weights are several matrices) and stays far from 32-bit index limits.
    MAX_MATRIX_ELEMENTS = 1 << 30

    def __init__(self, torch: Any, device: str, shapes: Shapes, slots: int, max_kv: int,
                 max_chunk: int, seed: int = 0, max_matrix_elements: int = MAX_MATRIX_ELEMENTS) -> None:
        self.torch = torch
        self.shapes = shapes
        dt = torch.bfloat16
        g = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape: int, std: float) -> Any:  # small values: no inf/NaN in bf16 sums
            return torch.empty(*shape, device=device, dtype=dt).normal_(0.0, std, generator=g)

        n_w = max(1, math.ceil(shapes.shared_rows * shapes.hidden / max_matrix_elements))
        rows = [shapes.shared_rows // n_w + (i < shapes.shared_rows % n_w) for i in range(n_w)]
        self.w_shared = [rnd(r, shapes.hidden, std=0.02) for r in rows]
        self.x_shared = rnd(shapes.hidden, std=1.0)
        self.w_prefill = rnd(shapes.hidden, shapes.ffn, std=0.02)
        self.x_prefill = rnd(max_chunk, shapes.hidden, std=1.0)
        self.q = rnd(max_chunk, shapes.kv_width, std=0.01)
        self.kv = [rnd(max_kv, shapes.kv_width, std=0.01) for _ in range(slots)]  # one per request slot
        self.v = rnd(shapes.kv_width, std=1.0)
        self.slots = slots
        self._views: dict[tuple[int, int], Any] = {}  # (slot, tokens) -> KV view: fewer host ops per row

    def _kv(self, slot: int, tokens: int) -> Any:
        v = self._views.get((slot, tokens))
        if v is None:
            v = self._views[(slot, tokens)] = self.kv[slot][:tokens]
        return v

    def run(self, kind: Kind, slot: int) -> None:
        t = self.torch
        if kind.phase is None:
            for w in self.w_shared:
                t.mv(w, self.x_shared)
        elif kind.phase == "prefill":
            x = self.x_prefill[: kind.n_tokens]
            for _ in range(self.shapes.prefill_reps):
                t.matmul(x, self.w_prefill)
            k = self._kv(slot, kind.kv_len)
            s = t.matmul(self.q[: kind.n_tokens], k.t())
            t.matmul(s, k)
        else:
            t.mv(self._kv(slot, kind.kv_len), self.v)

    @staticmethod
    def kernels_per_exec(kind: Kind, shapes: Shapes) -> int:
        if kind.phase is None:
            return max(1, math.ceil(shapes.shared_rows * shapes.hidden / Kernels.MAX_MATRIX_ELEMENTS))
        return shapes.prefill_reps + 2 if kind.phase == "prefill" else 1


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------
class _RecordingReader:
    """Delegates to a reader and keeps its first and latest values (raw counter delta)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.source = inner.source
        self.update_period_s = inner.update_period_s
        self.first_mj: list[int] | None = None
        self.last_mj: list[int] | None = None

    def device_names(self) -> list[str]:
        return self._inner.device_names()

    def energy_mj(self) -> list[int]:
        v = self._inner.energy_mj()
        if self.first_mj is None:
            self.first_mj = list(v)
        self.last_mj = list(v)
        return v

    def sharing_note(self) -> str | None:
        f = getattr(self._inner, "sharing_note", None)
        return f() if f is not None else None

    def close(self) -> None:
        self._inner.close()


class GpuBackend:
    """The kernels on cuda:0 (async launches, CUDA events), NVML through NvmlEnergyReader([0])."""

    mode = "gpu"

    def __init__(self, wl: Workload, shapes: Shapes) -> None:
        import torch  # only here and in the dry run's Kernels: never at import time

        if not torch.cuda.is_available():
            raise SystemExit("gpu_attribution_check: CUDA is not available; run on a GPU machine "
                             "or pass --dry-run")
        self._torch = torch
        # NVML first: fail in a second, not after allocating tens of GB.
        try:
            self._raw = NvmlEnergyReader([0])
        except EnergyReaderError as e:
            raise SystemExit(f"gpu_attribution_check: no NVML energy counter on cuda:0 "
                             f"({type(e).__name__}: {e})") from e
        self.gpu_name = self._raw.device_names()[0]
        self.predictor_gpu = self.gpu_name.split(" ", 1)[-1]
        need = (shapes.shared_bytes + wl.max_running * shapes.kv_bytes(wl.max_kv)
                + 4.0 * wl.chunk * (shapes.kv_width + shapes.ffn) + 2e9)
        free, total = torch.cuda.mem_get_info()
        if free < need:
            raise SystemExit(f"gpu_attribution_check: needs ~{need / 1e9:.1f} GB of GPU memory, "
                             f"{free / 1e9:.1f} GB free of {total / 1e9:.1f}")
        self.kern = Kernels(torch, "cuda", shapes, wl.max_running, wl.max_kv, wl.chunk)
        torch.cuda.synchronize()
        self.clock: Callable[[], float] = time.monotonic
        self.info = {"torch": torch.__version__, "cuda_device": torch.cuda.get_device_name(0),
                     "gpu_memory_gb": total / 1e9, "allocated_gb": torch.cuda.memory_allocated() / 1e9}

    def open_meter_reader(self) -> Any:
        return NvmlEnergyReader([0])

    def launch(self, kind: Kind, slot: int, times: int = 1, n_slots: int = 1) -> None:
        run = self.kern.run
        for i in range(times):
            run(kind, (slot + i) % n_slots if n_slots > 1 else slot)

    def event(self) -> Any:
        ev = self._torch.cuda.Event()
        ev.record()
        return ev

    def device_time_s(self, kind: Kind, k: int, n_slots: int) -> float:
        """GPU time per execution with the queue full: a ~25 ms device-side sleep holds the
        stream while the host queues ``k`` executions, then events time them. Compared with the
        alone window's time per execution it says whether the host kept the GPU busy."""
        torch = self._torch
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is None:
            return math.nan
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep(50_000_000)  # cycles: ~25 ms at ~2 GHz
        start.record()
        self.launch(kind, 0, k, n_slots)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / k

    def wait(self, ev: Any) -> None:
        ev.synchronize()

    def sync(self) -> None:
        self._torch.cuda.synchronize()

    def sleep(self, s: float) -> None:
        time.sleep(s)

    def read_mj(self) -> int:
        return self._raw.energy_mj()[0]

    def close(self) -> None:
        self._raw.close()


@dataclass(frozen=True)
class SimGpuModel:
    """The dry run's ground truth: an H100-like GPU with per-kind durations and powers.

    Its own model, not the meter's (Roofline at datasheet peaks): efficiencies below peak that
    depend on the kernel, different power per kind, per-kernel overheads. Watts and seconds.
    """

    shapes: Shapes
    idle_w: float = 72.0
    shared_bw: float = 3.7e12
    shared_w: float = 455.0
    gemm_flops_s: float = 720e12  # x n / (n + 96): short chunks run less efficiently
    attention_flops_s: float = 400e12
    attention_w: float = 540.0
    kv_bw: float = 3.0e12
    kv_w: float = 410.0
    kernel_overhead_s: float = 4e-6
    overhead_w: float = 170.0

    def segments(self, kind: Kind) -> list[tuple[float, float]]:
        """(seconds, watts) of one execution of ``kind`` on the device."""
        s = self.shapes
        if kind.phase is None:
            return [(8e-6 + s.shared_bytes / self.shared_bw, self.shared_w)]
        if kind.phase == "prefill":
            n, c = kind.n_tokens, kind.context
            eff = self.gemm_flops_s * n / (n + 96)
            gemm = (s.prefill_reps * 3e-6 + s.prefill_gemm_flops(n) / eff, 600.0 + 90.0 * n / (n + 256))
            att = (6e-6 + s.prefill_attention_flops(n, c) / self.attention_flops_s, self.attention_w)
            return [gemm, att]
        return [(self.kernel_overhead_s, self.overhead_w), (s.kv_bytes(kind.kv_len) / self.kv_bw, self.kv_w)]

    def energy_j(self, kind: Kind) -> float:
        return sum(d * p for d, p in self.segments(kind))

    def time_s(self, kind: Kind) -> float:
        return sum(d for d, _ in self.segments(kind))


class DryBackend:
    """Simulated GPU: a device timeline (launches queue, events are times), a power model
    integrated exactly by FakeEnergyReader, a ManualClock; the torch kernels run on tiny CPU
    tensors so that their code runs."""

    mode = "dry-run"
    HOST_LAUNCH_S = 4e-6  # host time per kernel launch
    LAUNCH_LATENCY_S = 5e-6
    SYNC_S = 10e-6
    READ_S = 20e-6  # one NVML read
    UPDATE_PERIOD_S = 0.1
    INTEGRATION_S = 1e-3

    def __init__(self, wl: Workload, shapes: Shapes) -> None:
        import torch

        # One thread: tiny ops interleaved with Python; a second OpenMP thread that the OS has
        # descheduled (shared CPUs) makes each op wait milliseconds for it.
        torch.set_num_threads(1)
        self.model = SimGpuModel(shapes)
        self.shapes = shapes
        self.clock = ManualClock(1000.0)
        # 4096-element matrices: the shared read is 4 GEMVs here, as it is 8 on the GPU
        self.kern = Kernels(torch, "cpu", TINY_SHAPES, wl.max_running, wl.max_kv, wl.chunk,
                            max_matrix_elements=4096)
        self._t0 = self.clock()
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._extra_w: list[float] = []  # power above idle
        self._cum_j: list[float] = [0.0]  # extra energy of intervals before i
        self.device_free = self._t0
        # Both readers now: same creation time, so their counters tick at the same instants.
        self._raw = self._make_reader()
        self._meter_reader = self._make_reader()
        self.gpu_name = "simulated H100-like GPU (dry run)"
        self.predictor_gpu = "NVIDIA H100 80GB HBM3"
        self.info = {"torch": torch.__version__, "sim_model": {
            k: v for k, v in asdict(self.model).items() if k != "shapes"}}

    # -- energy: exact cumulative energy, so the counter integrates it exactly --------------
    def _energy_j(self, t: float) -> float:
        e = self.model.idle_w * (t - self._t0)
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0:
            e += self._cum_j[i] + self._extra_w[i] * (min(t, self._ends[i]) - self._starts[i])
        return e

    def _power_w(self, t: float) -> float:
        h = self.INTEGRATION_S  # FakeNvml samples cell midpoints: return the cell's mean power
        return (self._energy_j(t + 0.5 * h) - self._energy_j(t - 0.5 * h)) / h

    def _make_reader(self) -> FakeEnergyReader:
        return FakeEnergyReader(self._power_w, clock=self.clock, update_period_s=self.UPDATE_PERIOD_S,
                                integration_step_s=self.INTEGRATION_S)

    def open_meter_reader(self) -> Any:
        return self._meter_reader

    def launch(self, kind: Kind, slot: int, times: int = 1, n_slots: int = 1) -> None:
        self.kern.run(kind, slot % self.kern.slots)  # the code path, once per launch call
        segs = self.model.segments(kind)
        dur = times * sum(d for d, _ in segs)
        energy = times * sum(d * p for d, p in segs)
        start = max(self.device_free, self.clock() + self.LAUNCH_LATENCY_S)
        self._starts.append(start)
        self._ends.append(start + dur)
        self._extra_w.append(energy / dur - self.model.idle_w)
        self._cum_j.append(self._cum_j[-1] + energy - self.model.idle_w * dur)
        self.device_free = start + dur
        self.clock.advance(self.HOST_LAUNCH_S * times * Kernels.kernels_per_exec(kind, self.shapes))

    def event(self) -> float:
        return self.device_free

    def device_time_s(self, kind: Kind, k: int, n_slots: int) -> float:
        t0 = max(self.device_free, self.clock() + self.LAUNCH_LATENCY_S)
        self.launch(kind, 0, k, n_slots)
        return (self.device_free - t0) / k

    def wait(self, ev: float) -> None:
        if ev > self.clock():
            self.clock.set(ev)
        self.clock.advance(self.SYNC_S)

    def sync(self) -> None:
        self.wait(self.device_free)

    def sleep(self, s: float) -> None:
        self.clock.advance(s)

    def read_mj(self) -> int:
        self.clock.advance(self.READ_S)
        return self._raw.energy_mj()[0]

    def close(self) -> None:
        self._raw.close()


# --------------------------------------------------------------------------------------------
# Counter measurements: idle power, update period, alone cost per kind
# --------------------------------------------------------------------------------------------
class _ChangeLog:
    """Times at which the polled counter changed (for the update period)."""

    def __init__(self) -> None:
        self.gaps_s: list[float] = []
        self._last_t: float | None = None
        self._last_v: int | None = None

    def see(self, t: float, v: int) -> bool:
        changed = self._last_v is not None and v != self._last_v
        if changed:
            if self._last_t is not None:
                self.gaps_s.append(t - self._last_t)
            self._last_t = t
        self._last_v = v
        return changed

    def reset_origin(self) -> None:
        self._last_t = None
        self._last_v = None


def measure_idle_power_w(be: Any, seconds: float, poll_s: float = 0.002) -> dict:
    """Counter slope between the first and last change seen while idle, watts."""
    be.sync()
    log = _ChangeLog()
    t_end = be.clock() + seconds
    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None
    while be.clock() < t_end:
        be.sleep(poll_s)
        t, v = be.clock(), be.read_mj()
        if log.see(t, v):
            if first is None:
                first = (t, v)
            last = (t, v)
    if first is None or last is None or last[0] <= first[0]:
        raise RuntimeError(f"the energy counter did not change twice in {seconds} s of idling")
    return {"power_w": (last[1] - first[1]) * 1e-3 / (last[0] - first[0]), "window_s": last[0] - first[0],
            "seconds": seconds}


def measure_update_period(be: Any, seconds: float) -> dict:
    """Read the counter in a tight loop (idle) and report the spacing of its changes."""
    be.sync()
    log = _ChangeLog()
    t_end = be.clock() + seconds
    reads = 0
    while be.clock() < t_end:
        log.see(be.clock(), be.read_mj())
        reads += 1
    return dict(_stats(log.gaps_s), reads=reads, read_interval_s=seconds / max(1, reads))


def _stats(xs: Sequence[float]) -> dict:
    if not xs:
        return {"n": 0, "median_s": math.nan, "p10_s": math.nan, "p90_s": math.nan,
                "min_s": math.nan, "max_s": math.nan}
    return {"n": len(xs), "median_s": statistics.median(xs), "p10_s": _quantile(xs, 0.1),
            "p90_s": _quantile(xs, 0.9), "min_s": min(xs), "max_s": max(xs)}


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(s) - 1)
    return s[i] + (s[j] - s[i]) * (pos - i)


def measure_alone(be: Any, kind: Kind, seconds: float, n_slots: int, log: _ChangeLog,
                  warm_s: float = 0.25, batch_s: float = 0.005) -> dict:
    """``kind`` alone, back to back, from one counter change to another >= ``seconds`` later.

    Batches of ~``batch_s`` with two in flight (the GPU never waits for the host); executions
    counted are those of the batches completed by the read that saw the change (the update
    instant is within one batch of it at both ends: <= 1% of a >= 1 s window).
    """
    be.sync()
    t = be.clock()
    be.launch(kind, 0, 4, n_slots)
    be.wait(be.event())
    tau0 = max((be.clock() - t) / 4.0, 1e-7)
    m = max(1, min(100000, round(batch_s / tau0)))
    pending: deque[tuple[Any, int]] = deque()
    state = {"slot": 0, "done": 0}

    def batch() -> None:
        be.launch(kind, state["slot"], m, n_slots)
        state["slot"] = (state["slot"] + m) % max(1, n_slots)
        pending.append((be.event(), m))
        if len(pending) > 1:
            ev, k = pending.popleft()
            be.wait(ev)
            state["done"] += k

    t_warm = be.clock() + warm_s
    while be.clock() < t_warm:  # clocks and power settle before the window opens
        batch()
    log.reset_origin()
    log.see(be.clock(), be.read_mj())
    t_last = be.clock()
    while True:
        batch()
        t, v = be.clock(), be.read_mj()
        if log.see(t, v):
            t_a, e_a, n_a = t, v, state["done"]
            break
        if t - t_last > _STALL_S:
            raise RuntimeError(f"the energy counter did not change for {_STALL_S} s under load")
    t_last = t_a
    while True:
        batch()
        t, v = be.clock(), be.read_mj()
        if log.see(t, v):
            t_last = t
            if t - t_a >= seconds:
                t_b, e_b, n_b = t, v, state["done"]
                break
        if t - t_last > _STALL_S:
            raise RuntimeError(f"the energy counter did not change for {_STALL_S} s under load")
    while pending:
        be.wait(pending.popleft()[0])
    log.reset_origin()
    n = n_b - n_a
    dev_s = be.device_time_s(kind, max(1, min(m, 200)), n_slots)
    return {"energy_j": (e_b - e_a) * 1e-3, "window_s": t_b - t_a, "executions": n, "batch": m,
            "device_time_s": dev_s, "device_busy_fraction": dev_s * n / (t_b - t_a)}


def alone_pass(be: Any, kinds: Sequence[Kind], seconds: float, n_slots: int, log: _ChangeLog) -> dict:
    return {k.key: measure_alone(be, k, seconds, n_slots, log) for k in kinds}


def alone_summary(passes: Sequence[dict], idle_w: float) -> dict:
    """Per-execution energy and time of one kind from its alone passes."""
    e = [p["energy_j"] / p["executions"] for p in passes]
    tau = [p["window_s"] / p["executions"] for p in passes]
    e_exec, tau_s = statistics.fmean(e), statistics.fmean(tau)
    busy = [p["device_busy_fraction"] for p in passes if p["device_busy_fraction"] == p["device_busy_fraction"]]
    return {"energy_j": e_exec, "spread_j": (max(e) - min(e)) / 2.0, "time_s": tau_s,
            "device_busy_fraction": min(busy) if busy else math.nan,
            "dynamic_energy_j": e_exec - idle_w * tau_s,
            "power_w": statistics.fmean(p["energy_j"] / p["window_s"] for p in passes),
            "passes": list(passes)}


# --------------------------------------------------------------------------------------------
# The engine: async-scheduled mixed steps driving EngineMeter
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Req:
    rid: str
    prompt: int
    out_tokens: int
    abort_after: int | None  # abort once this many tokens are out (0: after its first chunk)
    slot: int
    prefill_sched: int = 0  # prompt tokens scheduled
    decode_sched: int = 0  # decode rows scheduled
    prefill_done: int = 0  # prompt tokens processed (known)
    tokens_out: int = 0  # output tokens known
    done: bool = False
    aborted: bool = False
    late_rows: int = 0  # rows of steps scheduled before its finish was known, output after it
    counts: dict[str, int] = field(default_factory=dict)  # kind key -> rows that ran
    shared_frac: list[float] = field(default_factory=lambda: [0.0, 0.0])  # prefill, decode
    first: Any = None  # finished()'s answer
    final: Any = None  # pop_final()'s value


class Engine:
    """A vLLM-like engine core loop over the backend (see the module docstring)."""

    def __init__(self, be: Any, meter: EngineMeter, wl: Workload, seed: int, deadline_t: float) -> None:
        self.be = be
        self.meter = meter
        self.wl = wl
        self.rng = random.Random(seed)
        self.deadline_t = deadline_t
        self.reqs: list[Req] = []
        self.active: list[Req] = []  # admitted, finish not yet known (admission order)
        self.free_slots = list(range(wl.max_running))
        self.inflight: deque[tuple[int, list[tuple[Req, Kind]]]] = deque()
        self.events: dict[int, Any] = {}
        self.next_key = 0
        self.shared = Kind.shared()
        self.kind_counts: dict[str, int] = {}
        self.t0 = be.clock()
        self.stats = {"steps": 0, "rows": 0, "mixed_steps": 0, "prefill_steps": 0, "overlapped_starts": 0,
                      "finished": 0, "aborted": 0, "deadline_aborts": 0, "first_final": 0,
                      "finished_with_step_in_flight": 0, "idle_ticks": 0, "idle_reads": 0,
                      "finals": 0, "duplicate_finals": 0, "late_rows": 0, "max_rows": 0}
        self._last_tick = -math.inf
        self.phases: list[dict] = []

    # -- requests ----------------------------------------------------------------------------
    def _target(self) -> int:
        wl = self.wl
        x = 0.5 - 0.5 * math.cos(2.0 * math.pi * (self.be.clock() - self.t0) / wl.wave_s)
        return wl.min_running + round((wl.max_running - wl.min_running) * x)

    def _new_request(self) -> Req:
        wl, rng = self.wl, self.rng
        prompt = rng.choices(wl.prompts, weights=wl.prompt_weights)[0]
        out = rng.randint(wl.out_min, wl.out_max)
        abort = None
        if rng.random() < wl.abort_frac:  # a quarter of the aborts come during the prefill
            abort = 0 if rng.random() < 0.25 or out < 2 else rng.randint(1, out - 1)
        r = Req(f"r{len(self.reqs)}", prompt, out, abort, self.free_slots.pop())
        self.reqs.append(r)
        return r

    def _admit(self) -> None:
        target = self._target()
        while len(self.active) < target and self.free_slots:
            self.active.append(self._new_request())

    def _schedule(self) -> list[tuple[Req, Kind]]:
        wl = self.wl
        rows: list[tuple[Req, Kind]] = []
        chunk_given = False
        for r in self.active:
            if r.prefill_sched < r.prompt:
                if chunk_given:
                    continue  # one prefill chunk per step; the others wait
                chunk_given = True
                n = min(wl.chunk, r.prompt - r.prefill_sched)
                rows.append((r, Kind.prefill(n, r.prefill_sched)))
                r.prefill_sched += n
            else:
                rows.append((r, Kind.decode(wl.kv_bucket(r.prompt + r.decode_sched + 1))))
                r.decode_sched += 1
        return rows

    def _finish(self, r: Req, aborted: bool) -> None:
        in_flight = any(r is q for _, rows in self.inflight for q, _ in rows)
        r.done, r.aborted = True, aborted
        r.first = self.meter.finished(r.rid, aborted=aborted)
        self.stats["finished"] += 1
        self.stats["aborted"] += aborted
        self.stats["finished_with_step_in_flight"] += in_flight
        self.stats["first_final"] += bool(r.first.final)
        self.active.remove(r)
        self.free_slots.append(r.slot)  # a later step that reuses it runs after the in-flight one

    # -- steps -------------------------------------------------------------------------------
    def _start_step(self, rows: list[tuple[Req, Kind]]) -> None:
        key = self.next_key
        self.next_key += 1
        if self.inflight:
            self.stats["overlapped_starts"] += 1
        self.meter.step_started(key, [(r.rid, k.phase, k.n_tokens, k.context) for r, k in rows])
        be = self.be
        be.launch(self.shared, 0)
        share = 1.0 / len(rows)
        has_prefill = False
        for r, k in rows:
            be.launch(k, r.slot)
            r.counts[k.key] = r.counts.get(k.key, 0) + 1
            r.shared_frac[0 if k.phase == "prefill" else 1] += share
            self.kind_counts[k.key] = self.kind_counts.get(k.key, 0) + 1
            has_prefill |= k.phase == "prefill"
        self.kind_counts["shared"] = self.kind_counts.get("shared", 0) + 1
        self.events[key] = be.event()
        self.inflight.append((key, rows))
        st = self.stats
        st["steps"] += 1
        st["rows"] += len(rows)
        st["max_rows"] = max(st["max_rows"], len(rows))
        st["prefill_steps"] += has_prefill
        st["mixed_steps"] += has_prefill and len(rows) > 1

    def _finish_step(self) -> None:
        key, rows = self.inflight.popleft()
        self.be.wait(self.events.pop(key))
        self.meter.step_finished(key)
        for r, k in rows:  # the step's output
            if r.done:
                r.late_rows += 1
                self.stats["late_rows"] += 1
                continue
            if k.phase == "prefill":
                r.prefill_done += k.n_tokens
                if r.prefill_done >= r.prompt:
                    r.tokens_out = 1  # the last chunk samples the first token
            else:
                r.tokens_out += 1
            if r.abort_after is not None and r.tokens_out >= r.abort_after:
                self._finish(r, aborted=True)
            elif r.tokens_out >= r.out_tokens:
                self._finish(r, aborted=False)

    def _tick(self, force: bool = False) -> None:
        """The idle poller (10 Hz): idle_tick() and collecting final values."""
        now = self.be.clock()
        if not force and now - self._last_tick < _IDLE_TICK_S:
            return
        self._last_tick = now
        self.stats["idle_ticks"] += 1
        self.stats["idle_reads"] += bool(self.meter.idle_tick())
        self._collect()

    def _collect(self) -> None:
        for m in self.meter.pop_final():
            r = self._by_id.get(m.request_id)
            if r is None:
                continue
            if r.final is not None:
                self.stats["duplicate_finals"] += 1
            r.final = m
            self.stats["finals"] += 1

    @property
    def _by_id(self) -> dict[str, Req]:
        if len(getattr(self, "_index", {})) != len(self.reqs):
            self._index = {r.rid: r for r in self.reqs}
        return self._index

    # -- phases ------------------------------------------------------------------------------
    def busy(self, seconds: float) -> None:
        be = self.be
        t_start = be.clock()
        until = min(t_start + seconds, self.deadline_t)
        steps0 = self.stats["steps"]
        while True:
            now = be.clock()
            admitting = now < until
            if not admitting and now >= self.deadline_t and self.active:
                for r in list(self.active):  # out of time: client aborts, steps still in flight
                    self.stats["deadline_aborts"] += 1
                    self._finish(r, aborted=True)
            if admitting:
                self._admit()
            rows = self._schedule()
            if rows:
                self._start_step(rows)
            if self.inflight and (len(self.inflight) >= 2 or not rows):
                self._finish_step()  # async: step N+1 was launched before waiting for N
            elif not rows and not self.inflight and not admitting and not self.active:
                break
            self._tick()
        self.phases.append({"phase": "busy", "seconds": be.clock() - t_start,
                            "admitting_s": until - t_start, "steps": self.stats["steps"] - steps0})

    def idle(self, seconds: float) -> None:
        be = self.be
        t_start = be.clock()
        while be.clock() - t_start < seconds:
            be.sleep(_IDLE_TICK_S)
            self._tick(force=True)
        self.phases.append({"phase": "idle", "seconds": be.clock() - t_start})

    def tail(self, max_s: float) -> None:
        """Idle ticks until every finished request has its final value (or ``max_s``)."""
        be = self.be
        t_start = be.clock()
        while be.clock() - t_start < max_s:
            be.sleep(_IDLE_TICK_S)
            self._tick(force=True)
            if all(r.final is not None for r in self.reqs if r.done):
                break
        self.phases.append({"phase": "tail", "seconds": be.clock() - t_start})


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------
def _rel(a: float, b: float) -> float:
    return (a - b) / b if b > 0 else math.nan


def _err_stats(errs: Sequence[float]) -> dict:
    e = [x for x in errs if x == x]
    a = [abs(x) for x in e]
    return {"n": len(e), "median_abs": statistics.median(a) if a else math.nan,
            "p90_abs": _quantile(a, 0.9), "median": statistics.median(e) if e else math.nan,
            "max_abs": max(a) if a else math.nan}


def compare(reqs: Sequence[Req], alone: dict[str, dict], idle_w: float) -> dict:
    """Per-request meter values vs truth (module docstring), and the summary statistics."""
    sh = alone["shared"]
    rows: list[dict] = []
    for r in reqs:
        t_ph = [0.0, 0.0]
        dyn = 0.0
        busy_s = 0.0
        for key, n in r.counts.items():
            a = alone[key]
            t_ph[0 if key.startswith("prefill") else 1] += n * a["energy_j"]
            dyn += n * a["dynamic_energy_j"]
            busy_s += n * a["time_s"]
        t_ph[0] += r.shared_frac[0] * sh["energy_j"]
        t_ph[1] += r.shared_frac[1] * sh["energy_j"]
        frac = r.shared_frac[0] + r.shared_frac[1]
        dyn += frac * sh["dynamic_energy_j"]
        busy_s += frac * sh["time_s"]
        m = r.final
        row = {"request_id": r.rid, "prompt": r.prompt, "out_tokens": r.out_tokens, "aborted": r.aborted,
               "tokens_out": r.tokens_out, "rows": sum(r.counts.values()), "late_rows": r.late_rows,
               "truth_j": t_ph[0] + t_ph[1], "truth_prefill_j": t_ph[0], "truth_decode_j": t_ph[1],
               "truth_dynamic_j": dyn, "truth_busy_s": busy_s, "has_final": m is not None,
               "counts": dict(r.counts), "shared_frac": list(r.shared_frac),
               "first_energy_j": r.first.energy_j if r.first is not None else math.nan,
               "first_final": bool(r.first.final) if r.first is not None else False}
        if m is not None:
            row.update({"energy_j": m.energy_j, "prefill_j": m.prefill_energy_j, "decode_j": m.decode_energy_j,
                        "uncertainty_j": m.uncertainty_j, "estimated_j": m.estimated_energy_j,
                        "final": bool(m.final), "source": m.source, "n_steps": m.n_steps,
                        "mean_batch": m.mean_batch})
            err = m.energy_j - row["truth_j"]
            row["rel_error"] = _rel(m.energy_j, row["truth_j"])
            row["rel_error_prefill"] = _rel(m.prefill_energy_j, t_ph[0])
            row["rel_error_decode"] = _rel(m.decode_energy_j, t_ph[1])
            row["rel_error_dynamic"] = _rel(m.energy_j - idle_w * busy_s, dyn)
            row["within_uncertainty"] = bool(abs(err) <= m.uncertainty_j)
            row["within_2u"] = bool(abs(err) <= 2.0 * m.uncertainty_j)
        rows.append(row)
    scored = [x for x in rows if x["has_final"] and x["truth_j"] > 0 and x["energy_j"] == x["energy_j"]]
    sum_meter = sum(x["energy_j"] for x in scored)
    sum_truth = sum(x["truth_j"] for x in scored)
    scale = sum_meter / sum_truth if sum_truth > 0 else math.nan
    for x in scored:
        x["rel_error_split_only"] = _rel(x["energy_j"], scale * x["truth_j"])
    summary = {
        "n_requests": len(rows), "n_scored": len(scored),
        "n_without_final": sum(not x["has_final"] for x in rows if x["rows"] > 0),
        "n_zero_truth": sum(x["truth_j"] <= 0 for x in rows),
        "n_aborted": sum(x["aborted"] for x in rows),
        "total": _err_stats([x["rel_error"] for x in scored]),
        "prefill": _err_stats([x["rel_error_prefill"] for x in scored if x["truth_prefill_j"] > 0]),
        "decode": _err_stats([x["rel_error_decode"] for x in scored if x["truth_decode_j"] > 0]),
        "split_only": _err_stats([x["rel_error_split_only"] for x in scored]),
        "split_only_scale": scale,
        "dynamic": _err_stats([x["rel_error_dynamic"] for x in scored]),
        "first_answer": _err_stats([_rel(x["first_energy_j"], x["truth_j"]) for x in scored]),
        "first_answer_final_share": (sum(x["first_final"] for x in scored) / len(scored)) if scored else math.nan,
        "coverage_1u": (sum(x["within_uncertainty"] for x in scored) / len(scored)) if scored else math.nan,
        "coverage_2u": (sum(x["within_2u"] for x in scored) / len(scored)) if scored else math.nan,
        "median_rel_uncertainty": statistics.median(
            x["uncertainty_j"] / x["energy_j"] for x in scored if x["energy_j"] > 0) if scored else math.nan,
        "all_final": all(x["final"] for x in scored),
        "sum_meter_j": sum_meter, "sum_truth_j": sum_truth,
    }
    return {"requests": rows, "summary": summary}


def step_cost_diagnostics(predictor: Any, kinds: Sequence[Kind], alone: dict[str, dict]) -> dict:
    """Per kind: the meter model's seconds (Roofline at peak) and the measured J per such second."""
    out: dict[str, Any] = {}
    try:
        c = StepCostModel.from_predictor(predictor)
        for k in kinds:
            if k.phase is None:
                s = c.shared_step_s(1)
            elif k.phase == "prefill":
                s = float(c.rows_s([k.n_tokens], [k.context])[0])
            else:
                s = c.decode_row_s(k.context)
            e = alone[k.key]["energy_j"]
            out[k.key] = {"model_s": s, "j_per_model_s": e / s if s > 0 else math.nan}
    except Exception as e:  # noqa: BLE001 - a diagnostic: never fail the check for it
        out["error"] = f"{type(e).__name__}: {e}"
    return out


# --------------------------------------------------------------------------------------------
# The whole check
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    idle_s: float
    period_s: float
    warm_s: float
    alone_s: float
    startup_idle_s: float
    busy_s: float
    idle_spell_s: float
    tail_s: float
    max_runtime_s: float


def _raw_requests(reqs: Sequence[Req]) -> list[dict]:
    """What the truths and errors are computed from (kept in a checkpoint before the comparison)."""
    return [{"request_id": r.rid, "prompt": r.prompt, "out_tokens": r.out_tokens, "aborted": r.aborted,
             "counts": dict(r.counts), "shared_frac": list(r.shared_frac),
             "first": dict(r.first.__dict__) if r.first is not None else None,
             "final": dict(r.final.__dict__) if r.final is not None else None} for r in reqs]


def run_check(be: Any, wl: Workload, plan: Plan, seed: int = 0, wall0: float | None = None,
              partial: dict | None = None, checkpoint: Callable[[], None] | None = None) -> dict:
    """The whole check (module docstring). ``partial`` collects raw results as they come and
    ``checkpoint()`` is called after each phase, so a failure late in a GPU run loses nothing."""
    wall0 = time.monotonic() if wall0 is None else wall0
    partial = {} if partial is None else partial
    checkpoint = checkpoint or (lambda: None)
    sim_t0 = be.clock()
    kinds = wl.kinds()
    n_slots = wl.max_running

    def elapsed() -> float:  # budget: wall time on the GPU, simulated time in the dry run
        return (time.monotonic() - wall0) if be.mode == "gpu" else (be.clock() - sim_t0)

    be.sleep(1.0 if be.mode == "gpu" else 0.2)  # settle after allocation
    idle_start = measure_idle_power_w(be, plan.idle_s)
    period = measure_update_period(be, plan.period_s)
    idle_w = idle_start["power_w"]
    partial.update(idle_start=idle_start, update_period=period)

    t_warm = be.clock() + plan.warm_s  # clocks and temperature up before the alone windows
    while be.clock() < t_warm:
        for k in kinds:
            be.launch(k, 0)
        be.sync()
    log_load = _ChangeLog()
    pass_a = alone_pass(be, kinds, plan.alone_s, n_slots, log_load)
    t_after_a = elapsed()
    partial.update(alone_pass_a=pass_a, elapsed_after_pass_a_s=t_after_a)
    checkpoint()

    predictor_note = None
    try:
        predictor = Predictor.from_config(MODEL_CONFIG, gpu=be.predictor_gpu)
    except Exception as e:  # noqa: BLE001 - an unknown GPU name: model an H100 and say so
        predictor_note = f"{be.predictor_gpu!r}: {type(e).__name__}: {e}; predictor built for H100"
        predictor = Predictor.from_config(MODEL_CONFIG, gpu="H100")
    reader = _RecordingReader(be.open_meter_reader())
    sharing = reader.sharing_note()
    meter = EngineMeter(reader, predictor, clock=be.clock)
    # Leave time for the tail, pass B and the final idle after the engine phase.
    reserve_s = t_after_a + plan.tail_s + plan.idle_s + 10.0
    deadline_t = be.clock() + max(5.0, plan.max_runtime_s - reserve_s - elapsed())
    eng = Engine(be, meter, wl, seed, deadline_t)
    eng.idle(plan.startup_idle_s)  # the production poller runs from start-up (idle power)
    eng.busy(plan.busy_s)
    eng.idle(plan.idle_spell_s)
    eng.busy(plan.busy_s)
    eng.tail(plan.tail_s)
    totals = meter.totals()
    meter.close()
    partial.update(engine_stats=eng.stats, engine_phases=eng.phases, kind_counts=eng.kind_counts,
                   meter_totals=totals, counter_first_last_mj=[reader.first_mj, reader.last_mj],
                   requests_raw=_raw_requests(eng.reqs))
    checkpoint()

    pass_b = None
    if elapsed() + t_after_a + plan.idle_s + 5.0 <= plan.max_runtime_s:
        pass_b = alone_pass(be, kinds[::-1], plan.alone_s, n_slots, log_load)
    be.sleep(0.5 if be.mode == "gpu" else 0.0)
    idle_end = measure_idle_power_w(be, plan.idle_s)
    partial.update(alone_pass_b=pass_b, idle_end=idle_end)
    checkpoint()

    alone = {k.key: alone_summary([pass_a[k.key]] + ([pass_b[k.key]] if pass_b else []), idle_w)
             for k in kinds}
    cmp = compare(eng.reqs, alone, idle_w)
    finals_j = sum(x["energy_j"] for x in cmp["requests"] if x["has_final"] and x["energy_j"] == x["energy_j"])
    s = finals_j + totals["idle_j"] + totals["unreported_j"]
    raw_delta = ((reader.last_mj[0] - reader.first_mj[0]) * 1e-3
                 if reader.first_mj and reader.last_mj else math.nan)
    err = s - totals["total_j"]
    tol = 1e-6 * max(1.0, totals["total_j"])
    conservation = {
        "finals_j": finals_j, "idle_j": totals["idle_j"], "unreported_j": totals["unreported_j"],
        "sum_j": s, "total_j": totals["total_j"], "counter_delta_j": raw_delta, "error_j": err,
        "live": totals["live"], "pending": totals["pending"],
        "holds": bool(abs(err) <= tol and abs(totals["total_j"] - raw_delta) <= tol
                      and totals["live"] == 0 and totals["pending"] == 0),
    }
    attributed = finals_j + totals["unreported_j"]
    st = eng.stats
    return {
        "mode": be.mode,
        "gpu_name": be.gpu_name,
        "predictor_gpu": be.predictor_gpu if predictor_note is None else "H100",
        "predictor_note": predictor_note,
        "predictor": getattr(predictor.weights, "label", "?"),
        "model_config": MODEL_CONFIG,
        "shapes": asdict(Shapes.from_config(MODEL_CONFIG)),
        "backend": be.info,
        "meter_source": meter.source,
        "meter_reader_update_period_s": reader.update_period_s,
        "sharing_note": sharing,
        "workload": asdict(wl),
        "plan": asdict(plan),
        "seed": seed,
        "idle": {"power_w": idle_w, "start": idle_start, "end": idle_end},
        "update_period": {"tight_loop_idle": period, "under_load_batch_resolution": _stats(log_load.gaps_s)},
        "kinds": [asdict(k) for k in kinds],
        "alone": alone,
        "alone_passes": 2 if pass_b else 1,
        "step_cost_model": step_cost_diagnostics(predictor, kinds, alone),
        "engine": {"stats": st, "phases": eng.phases, "kind_counts": eng.kind_counts,
                   "mean_rows_per_step": st["rows"] / st["steps"] if st["steps"] else math.nan,
                   "requests": len(eng.reqs)},
        "conservation": conservation,
        "additivity": {"sum_truth_j": cmp["summary"]["sum_truth_j"], "attributed_j": attributed,
                       "rel_error": _rel(attributed, cmp["summary"]["sum_truth_j"])},
        "summary": cmp["summary"],
        "requests": cmp["requests"],
        "runtime_s": time.monotonic() - wall0,
        "simulated_s": be.clock() - sim_t0 if be.mode != "gpu" else None,
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x * 100:.1f}%"


def format_report(rep: dict) -> str:
    up = rep["update_period"]["tight_loop_idle"]
    ul = rep["update_period"]["under_load_batch_resolution"]
    e, st, s = rep["engine"], rep["engine"]["stats"], rep["summary"]
    L = [
        f"gpu_attribution_check ({rep['mode']}) on {rep['gpu_name']}; meter predictor "
        f"{rep['predictor_gpu']} ({rep['predictor']}), shapes of {rep['model_config']['_name_or_path']}",
        f"idle power (start, {rep['idle']['start']['seconds']:.1f} s): {rep['idle']['power_w']:.1f} W; "
        f"at the end: {rep['idle']['end']['power_w']:.1f} W",
        f"counter update period, tight loop while idle: median {up['median_s'] * 1e3:.2f} ms (p10 "
        f"{up['p10_s'] * 1e3:.2f}, p90 {up['p90_s'] * 1e3:.2f}, n={up['n']}, one read every "
        f"{up['read_interval_s'] * 1e6:.0f} us); under load (~5 ms resolution): median "
        f"{ul['median_s'] * 1e3:.1f} ms (n={ul['n']}); meter's reader assumes "
        f"{rep['meter_reader_update_period_s'] * 1e3:.0f} ms",
    ]
    if rep.get("predictor_note"):
        L.append(f"predictor note: {rep['predictor_note']}")
    if rep.get("sharing_note"):
        L.append(f"GPU sharing: {rep['sharing_note']}")
    L += ["", f"alone, per execution (mean of {rep['alone_passes']} pass(es); J include idle-level power):",
          f"  {'kind':<22} {'in steps':>8} {'J/exec':>10} {'+-spread':>9} {'ms/exec':>9} {'W':>6} "
          f"{'dyn J':>10} {'model ms':>9} {'J/model s':>10} {'GPU busy':>8}"]
    for k in rep["kinds"]:
        a = rep["alone"][k["key"]]
        d = rep["step_cost_model"].get(k["key"], {})
        L.append(f"  {k['key']:<22} {e['kind_counts'].get(k['key'], 0):8d} {a['energy_j']:10.4f} "
                 f"{a['spread_j']:9.4f} {a['time_s'] * 1e3:9.3f} {a['power_w']:6.0f} {a['dynamic_energy_j']:10.4f} "
                 f"{d.get('model_s', math.nan) * 1e3:9.3f} {d.get('j_per_model_s', math.nan):10.1f} "
                 f"{_pct(a['device_busy_fraction']):>8}")
    L.append("  (GPU busy: device time per execution with the queue full / window time per execution; "
             "well below 100% means the host, not the GPU, set the pace of that kind's alone window)")
    phases = ", ".join(f"{p['phase']} {p['seconds']:.1f} s" for p in e["phases"])
    L += ["", f"engine: {phases}",
          f"  {st['steps']} steps ({st['prefill_steps']} with a prefill chunk, {st['mixed_steps']} mixed "
          f"prefill+decode), mean {e['mean_rows_per_step']:.1f} rows/step (max {st['max_rows']}), "
          f"{st['overlapped_starts']} started before the previous step finished",
          f"  {e['requests']} requests, {st['finished']} finished ({st['aborted']} aborted, "
          f"{st['deadline_aborts']} at the time limit), {st['finished_with_step_in_flight']} finished with a "
          f"step holding them in flight, {st['late_rows']} late rows; first answers final: {st['first_final']}",
          f"  idle ticks {st['idle_ticks']} ({st['idle_reads']} read the counter); finals {st['finals']} "
          f"(duplicates {st['duplicate_finals']}, finished without a final {s['n_without_final']})",
          "", f"meter final vs truth, per request (n={s['n_scored']}):",
          f"  {'':<34} {'median|err|':>11} {'p90|err|':>9} {'median err':>10}"]
    for name, key in (("total", "total"), ("prefill", "prefill"), ("decode", "decode"),
                      (f"total, split only (x{s['split_only_scale']:.3f})", "split_only"),
                      ("total, dynamic (idle power removed)", "dynamic"),
                      (f"first answers ({_pct(s['first_answer_final_share'])} final)", "first_answer")):
        x = s[key]
        L.append(f"  {name:<34} {_pct(x['median_abs']):>11} {_pct(x['p90_abs']):>9} {_pct(x['median']):>10}")
    c, ad = rep["conservation"], rep["additivity"]
    L += [f"uncertainty coverage: |err| <= u for {_pct(s['coverage_1u'])}, <= 2u for {_pct(s['coverage_2u'])}; "
          f"median u/E {_pct(s['median_rel_uncertainty'])}",
          f"conservation: finals {c['finals_j']:.3f} + idle {c['idle_j']:.3f} + unreported {c['unreported_j']:.3f} = "
          f"{c['sum_j']:.3f} J vs counter total {c['total_j']:.3f} J (raw counter delta {c['counter_delta_j']:.3f} J) "
          f"-> {'OK' if c['holds'] else 'FAILS'} (error {c['error_j']:.2e} J, live {c['live']}, pending {c['pending']})",
          f"additivity: truths (alone costs) sum to {ad['sum_truth_j']:.2f} J; the meter gave requests "
          f"{ad['attributed_j']:.2f} J ({_pct(ad['rel_error'])})",
          f"runtime {rep['runtime_s']:.1f} s wall" + (
              f" ({rep['simulated_s']:.1f} s simulated)" if rep.get("simulated_s") else "")]
    return "\n".join(L) + "\n"


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv: Sequence[str] | None = None) -> dict:
    wall0 = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "./gpu-check-out")
    p.add_argument("--dry-run", action="store_true",
                   help="simulated GPU on the CPU (FakeEnergyReader + ManualClock, tiny CPU tensors)")
    p.add_argument("--busy-s", type=float, default=None, help="each of the two busy spells (35; dry 5)")
    p.add_argument("--idle-spell-s", type=float, default=None, help="idle spell between them (5; dry 2)")
    p.add_argument("--alone-s", type=float, default=1.2, help="alone window per kind and pass, >= 1 (1.2)")
    p.add_argument("--idle-s", type=float, default=3.0, help="idle power window, >= 2 (3)")
    p.add_argument("--period-s", type=float, default=1.0, help="tight-loop read of the counter (1)")
    p.add_argument("--max-runtime-s", type=float, default=330.0,
                   help="stop admitting and abort what runs to finish within this (330)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    dry = args.dry_run
    plan = Plan(idle_s=args.idle_s, period_s=args.period_s, warm_s=0.5 if dry else 3.0, alone_s=args.alone_s,
                startup_idle_s=1.0, busy_s=args.busy_s if args.busy_s is not None else (5.0 if dry else 35.0),
                idle_spell_s=args.idle_spell_s if args.idle_spell_s is not None else (2.0 if dry else 5.0),
                tail_s=3.0, max_runtime_s=args.max_runtime_s)
    if plan.alone_s < 1.0 or plan.idle_s < 2.0 or plan.busy_s <= 0 or plan.idle_spell_s < 0 or plan.period_s <= 0:
        p.error("--alone-s must be >= 1, --idle-s >= 2, --busy-s and --period-s > 0, --idle-spell-s >= 0")
    wl = Workload()
    shapes = Shapes.from_config(MODEL_CONFIG)
    out = Path(args.out)
    be = DryBackend(wl, shapes) if dry else GpuBackend(wl, shapes)
    out.mkdir(parents=True, exist_ok=True)
    partial: dict[str, Any] = {"complete": False, "mode": be.mode, "gpu_name": be.gpu_name,
                               "plan": asdict(plan), "seed": args.seed}

    def checkpoint() -> None:  # raw results so far: kept if a later phase fails or is killed
        (out / "report.json").write_text(json.dumps(_json_safe(partial), indent=1))

    try:
        rep = run_check(be, wl, plan, args.seed, wall0, partial, checkpoint)
    except (Exception, KeyboardInterrupt):
        import traceback

        partial["error"] = traceback.format_exc()
        checkpoint()
        (out / "report.txt").write_text(f"gpu_attribution_check FAILED; raw results so far in "
                                        f"report.json\n{partial['error']}")
        raise
    finally:
        be.close()
    rep["complete"] = True
    (out / "report.json").write_text(json.dumps(_json_safe(rep), indent=1))
    text = format_report(rep)
    (out / "report.txt").write_text(text)
    print(text, end="")
    print(f"wrote {out / 'report.json'} and {out / 'report.txt'}")
    return rep


if __name__ == "__main__":
    main(sys.argv[1:])
