"""Discrete-event simulation of vLLM v1 engine cores driving :class:`EngineMeter`, with a
ground-truth power model that is NOT the attributor's (test helper; no vLLM import).

What is simulated (vLLM 0.32, read from ``vllm/v1/core/sched/scheduler.py``,
``async_scheduler.py`` and ``vllm/v1/engine/core.py``):

* Engine loop. ``step_with_batch_queue`` with a batch queue of 2 (async scheduling, vLLM's
  default in 0.32) or 1 (``EngineCore.step``, synchronous): ``schedule()`` (hook:
  ``step_started``), the GPU runs the step when the previous one is done, then, in the order of
  ``core.py``: pending aborts are processed (``_process_aborts_queue``: ``finished(aborted=True)``),
  ``update_from_output`` (hook: ``step_finished`` first) frees requests that finished in that
  step (``finished``). With async scheduling step N+1 is scheduled (and holds every running
  request, with a placeholder for N's token) before N's ``step_finished``, so a request that
  finishes in N is also in N+1 and is freed between N's and N+1's ``step_finished``.
  When no request is left the loop stops calling the scheduler (``step()`` returns before
  ``schedule()``): nothing reaches the meter except the idle poller, which calls
  ``EngineMeter.idle_tick()`` (fallback ``attributor.poll()``) every ``idle_tick_s`` (random in
  the range) of idle time, never while a step is scheduled or running.
* Scheduler. FCFS continuous batching: running requests first (a prefill chunk or 1 decode
  token each, capped by the token budget ``max_num_batched_tokens``), then waiting ones up to
  ``max_num_seqs``; chunked prefill mixes chunks with decode rows. KV blocks of 16 tokens: when a
  running request cannot get its blocks the last running request is preempted
  (``preempted``), loses its KV and goes to the front of the queue; on resume a prefix-cache hit
  keeps a block-aligned part of what it had computed (``resume_hit_fraction``), so it recomputes
  only what missed. New requests may hit a shared system prompt in the prefix cache.
* Request ends: EOS / max tokens (freed in the ``update_from_output`` of the step that sampled
  the last token), stop strings (the API side detects the stop after the last useful token and
  its abort reaches the engine one or two steps later: ``aborted=True``), client aborts at any
  time (waiting, running, or while a step holding the request is in flight).
* Rows given to the meter are what ``hooks/engine_core.py`` produces under the position rule:
  ``(request_id, phase, n_tokens, context_len_before)``; tokens at positions
  ``< num_prompt_tokens`` are ``"prefill"``, later positions ``"decode"`` (recompute after
  preemption included); a chunk straddling the boundary is two rows, the decode row's context
  being the prefill row's end.

Ground truth (per device; a TP group splits the work evenly, each device with its own fixed
efficiency factor ``f_d`` and idle power ``p_idle_d``):

* Step duration (own cost model, not the predictor's): ``launch_s + max(flops / (TP *
  peak_flops), bytes / (TP * mem_bw))`` with ``bytes`` = weights once + each row's KV reads
  and writes.
* Step energy on device d = ``p_idle_d * duration`` + SHARED (weight bytes x J/byte, once per
  step whatever the number of rows, times a per-step noise factor) / TP * f_d + sum of PER-ROW
  parts / TP * f_d. A row's part = (2 x params x n_tokens + attention FLOPs over its context)
  x J/FLOP + (context KV read + own KV write) x J/byte, times a per-row noise factor.
  Power between steps is ``p_idle_d``.
* True per-request energy (the definition the measurement is checked against): its rows'
  per-row parts plus, in each step it is in, an equal share (among the step's requests) of the
  step's shared part and idle baseline (``p_idle * duration``). A request with two rows in one
  step (straddling chunk) splits its share between its phases by tokens. Phases by position,
  as for the rows. Work in steps that finish after the request was freed (async look-ahead,
  aborts) is the request's *late* energy: it is in the truth (the GPU did it for that request)
  and also reported separately (``truth_late_j``). Power drawn between steps belongs to no
  request (idle).

Counters: one per device, integer mJ, monotonic, equal to floor(1000 x integral of the device's
true power) at its latest update instant; update instants every ``update_period_s`` (drawn
per device in the given range) with +-``period_jitter`` relative jitter per interval, and a
random phase per device (TP devices update at different instants). :class:`SimEnergyReader`
has the EnergyReader protocol (``source = "fake"``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmco2_serve.runtime.engine_meter import EngineMeter
from llmco2_serve.hardware.gpu_energy import ManualClock

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "architectures": ["LlamaForCausalLM"]}

TRACE_CSV = Path(__file__).resolve().parents[1] / "llmco2_serve" / "data" / "azure_trace_slice.csv"


# ----------------------------------------------------------------------------- ground truth
@dataclass(frozen=True)
class PowerModel:
    """Llama-3.1-8B-like model on H100-like GPUs; numbers are per TP group (split over TP)."""

    params: float = 8.03e9
    weight_bytes: float = 16.06e9  # bf16 weights, read once per step
    kv_bytes_per_token: float = 131072.0  # 2 (K,V) x 32 layers x 8 heads x 128 x 2 bytes
    attn_flops_per_token_ctx: float = 4.0 * 32 * 4096  # QK^T + AV per layer per context position
    peak_flops: float = 4.0e14  # achieved bf16 FLOP/s per device
    mem_bw: float = 2.6e12  # achieved bytes/s per device
    launch_s: float = 0.003  # fixed per-step overhead (launches, sampling, sync)
    j_per_flop: float = 1.0e-12  # dynamic energy per FLOP
    j_per_byte: float = 6.0e-11  # dynamic energy per HBM byte (with on-chip movement)
    step_noise: float = 0.05  # lognormal sigma of the shared part, per step
    row_noise: float = 0.10  # lognormal sigma of each row's part


def row_costs(pm: PowerModel, n: np.ndarray, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flops, bytes, dynamic joules before noise) of rows of n new tokens after ctx tokens."""
    flops = 2.0 * pm.params * n + pm.attn_flops_per_token_ctx * n * (ctx + (n + 1) * 0.5)
    byts = pm.kv_bytes_per_token * (ctx + n)
    return flops, byts, flops * pm.j_per_flop + byts * pm.j_per_byte


# ----------------------------------------------------------------------------- counters
class SimDevice:
    """One GPU: a piecewise-constant true power timeline and an NVML-like counter."""

    def __init__(self, name: str, idle_w: float, factor: float, update_period_s: float,
                 period_jitter: float, phase_s: float, t0: float, rng: np.random.Generator) -> None:
        self.name = name
        self.idle_w = float(idle_w)
        self.factor = float(factor)
        self.update_period_s = float(update_period_s)
        self.period_jitter = float(period_jitter)
        self._rng = rng
        self._segs: deque[tuple[float, float, float]] = deque()  # (t0, t1, watts), ordered
        self._end = t0  # end of the committed timeline (idle beyond)
        self._cur_t = t0  # integral known up to here
        self._cur_e = 0.0
        self._next_update = t0 + phase_s
        self._counter_mj = 0

    def add_busy(self, t0: float, t1: float, energy_j: float) -> None:
        if t0 < self._end - 1e-12:
            raise AssertionError(f"{self.name}: step at {t0} overlaps the timeline ending {self._end}")
        if t0 > self._end:
            self._segs.append((self._end, t0, self.idle_w))
        if t1 > t0:
            self._segs.append((t0, t1, energy_j / (t1 - t0)))
        self._end = max(t1, t0)

    def true_energy_j(self, t: float) -> float:
        """Exact integral of the true power from the start to t (t never goes backwards)."""
        if t < self._cur_t:
            raise AssertionError("time went backwards")
        segs = self._segs
        while segs and segs[0][1] <= t:
            a, b, p = segs.popleft()
            a = max(a, self._cur_t)
            self._cur_e += p * (b - a)
            self._cur_t = b
        if segs and segs[0][0] < t:
            a, _, p = segs[0]
            a = max(a, self._cur_t)
            self._cur_e += p * (t - a)
            self._cur_t = t
        elif t > self._cur_t:
            self._cur_e += self.idle_w * (t - self._cur_t)  # beyond the timeline: idle
            self._cur_t = t
        return self._cur_e

    def counter_mj(self, t: float) -> int:
        while self._next_update <= t:
            self._counter_mj = int(math.floor(1000.0 * self.true_energy_j(self._next_update) + 1e-6))
            j = self.period_jitter
            self._next_update += self.update_period_s * (1.0 + self._rng.uniform(-j, j))
        return self._counter_mj


class SimEnergyReader:
    """EnergyReader over simulated devices; records what it returned (conservation checks)."""

    source = "fake"

    def __init__(self, devices: Sequence[SimDevice], clock: Callable[[], float]) -> None:
        self.devices = list(devices)
        self._clock = clock
        self.update_period_s = max(d.update_period_s for d in self.devices)
        self.first_mj: list[int] | None = None
        self.last_mj: list[int] | None = None
        self.reads = 0
        self.closed = False

    def device_names(self) -> list[str]:
        return [d.name for d in self.devices]

    def energy_mj(self) -> list[int]:
        t = self._clock()
        v = [d.counter_mj(t) for d in self.devices]
        if self.first_mj is None:
            self.first_mj = list(v)
        self.last_mj = v
        self.reads += 1
        return list(v)

    def counters_delta_j(self) -> float:
        if self.first_mj is None or self.last_mj is None:
            return 0.0
        return sum(b - a for a, b in zip(self.first_mj, self.last_mj)) * 1e-3

    def close(self) -> None:
        self.closed = True


# ----------------------------------------------------------------------------- workload
@dataclass
class SimRequest:
    rid: str
    arrival_s: float
    prompt_len: int
    output_len: int  # tokens until EOS / max_tokens
    cached_prefix: int = 0  # prompt tokens found in the prefix cache at first schedule
    stop_at: int | None = None  # the stop string completes with this output token (API aborts later)
    abort_at_s: float | None = None  # client disconnects at this time
    engine: int = -1
    # scheduler state
    num_computed: int = 0
    num_tokens: int = 0  # prompt + sampled (incl. async placeholders)
    n_out: int = 0  # output tokens whose output was processed
    blocks: int = 0
    status: str = "new"  # new | waiting | running | done
    preemptions: int = 0
    ever_scheduled: bool = False
    stop_abort_update: int | None = None
    epoch: int = 0  # bumped at preemption: outputs of older in-flight steps are stale


def trace_requests(n: int, *, rate_per_s: float, trace: str = "conv",
                   max_prompt: int = 6000, max_output: int = 600) -> list[SimRequest]:
    """Requests from the Azure LLM inference trace slice (prompt and output lengths, arrival
    gaps rescaled to ``rate_per_s``), cycled if ``n`` exceeds the slice."""
    import csv
    from datetime import datetime

    rows = [r for r in csv.DictReader(TRACE_CSV.open()) if r["trace"] == trace]
    ts = [datetime.strptime(r["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp() for r in rows]
    gaps = np.diff(np.asarray(ts))
    gaps = np.clip(gaps, 0.0, None)
    scale = (1.0 / rate_per_s) / max(1e-9, float(gaps.mean()))
    out, t = [], 0.0
    for i in range(n):
        r = rows[i % len(rows)]
        t += float(gaps[i % len(gaps)]) * scale
        out.append(SimRequest(f"r{i}", t, max(1, min(max_prompt, int(r["ContextTokens"]))),
                              max(1, min(max_output, int(r["GeneratedTokens"])))))
    return out


def poisson_requests(n: int, *, rate_per_s: float, seed: int = 0, prompt: tuple[int, int] = (50, 2000),
                     output: tuple[int, int] = (10, 300), t0: float = 0.0) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    t = t0
    out = []
    for i in range(n):
        t += float(rng.exponential(1.0 / rate_per_s))
        p = int(np.exp(rng.uniform(np.log(prompt[0]), np.log(prompt[1]))))
        o = int(np.exp(rng.uniform(np.log(output[0]), np.log(output[1]))))
        out.append(SimRequest(f"r{i}", t, p, o))
    return out


def add_endings(reqs: Sequence[SimRequest], *, stop_frac: float = 0.0, abort_frac: float = 0.0,
                shared_prefix: int = 0, prefix_frac: float = 0.0, seed: int = 1,
                abort_within_s: float = 3.0) -> None:
    """Stop strings, client aborts and shared-prefix hits on a share of the requests."""
    rng = np.random.default_rng(seed)
    for r in reqs:
        if stop_frac and rng.random() < stop_frac and r.output_len > 2:
            r.stop_at = int(rng.integers(1, r.output_len))
        if abort_frac and rng.random() < abort_frac:
            r.abort_at_s = r.arrival_s + float(rng.uniform(0.0, abort_within_s))
        if prefix_frac and rng.random() < prefix_frac and r.prompt_len > shared_prefix + 16:
            r.cached_prefix = shared_prefix


# ----------------------------------------------------------------------------- engine
@dataclass
class EngineConfig:
    tp: int = 1
    async_scheduling: bool = True
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_blocks: int = 1 << 20  # effectively unlimited unless a scenario limits it
    sched_cpu_s: float = 0.0008  # schedule() + launch
    update_cpu_s: float = 0.0004  # update_from_output + output processing
    update_period_s: tuple[float, float] = (0.1, 0.1)  # per-device counter period range
    period_jitter: float = 0.1
    idle_w: tuple[float, float] = (70.0, 130.0)
    device_factor: tuple[float, float] = (0.95, 1.05)
    idle_tick_s: tuple[float, float] | None = (0.05, 0.2)
    resume_hit_fraction: tuple[float, float] = (0.3, 1.0)
    attributor_kwargs: dict = field(default_factory=dict)


@dataclass
class StepRecord:
    key: int
    rows: list[tuple[str, str, int, int]]
    start_s: float
    end_s: float
    energy_j: float  # all devices
    truth_by_req: dict[str, float]  # request's true energy in this step (all devices)


@dataclass
class Outcome:
    """Per request: ground truth and what the meter said."""

    rid: str
    engine: int
    prompt_len: int
    output_len: int
    truth_prefill_j: float = 0.0
    truth_decode_j: float = 0.0
    truth_late_j: float = 0.0
    first: Any = None  # MeasuredEnergy returned by finished()
    finals: list = field(default_factory=list)  # MeasuredEnergy delivered as final
    aborted: bool = False
    preemptions: int = 0
    freed_s: float | None = None

    @property
    def truth_j(self) -> float:
        return self.truth_prefill_j + self.truth_decode_j

    @property
    def final(self) -> Any:
        return self.finals[0] if self.finals else None


def _pop_final(meter: EngineMeter) -> list:
    f = getattr(meter, "pop_final", None)
    return list(f()) if f is not None else list(meter.attributor.pop_finalized())


def _idle_tick(meter: EngineMeter) -> None:
    f = getattr(meter, "idle_tick", None)
    if f is not None:
        f()
    else:
        meter.attributor.poll()


class SimEngine:
    """One engine core (one DP rank): scheduler, GPU timeline over its TP devices, meter."""

    def __init__(self, sim: Simulation, index: int, cfg: EngineConfig, devices: list[SimDevice],
                 predictor: Any, rng: np.random.Generator, read_devices: list[SimDevice] | None = None) -> None:
        self.sim = sim
        self.index = index
        self.cfg = cfg
        self.devices = devices  # where its steps run
        self.rng = rng
        self.pm = sim.pm
        clock = sim.clock
        self.reader = SimEnergyReader(devices if read_devices is None else read_devices, clock)
        self.meter = EngineMeter(self.reader, predictor, clock=clock, **cfg.attributor_kwargs)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.free_blocks = cfg.kv_blocks
        self.queue: deque[tuple[int, float, float, dict[str, int]]] = deque()  # (key, start, end, epochs)
        self.steps_by_key: dict[int, StepRecord] = {}
        self.gpu_free_s = clock()
        self.loop_pending = False
        self.idle_epoch = 0
        self.aborts: list[SimRequest] = []
        self.updates = 0
        self.n_steps = 0
        self.meter_s = 0.0  # time spent in meter calls on the step path
        self.meter_idle_s = 0.0
        self.idle_ticks = 0
        self.stop_pending: list[SimRequest] = []
        self._next_key = 0
        self.keep_steps = sim.keep_steps
        self.step_log: list[StepRecord] = []
        self.max_sizes: dict[str, int] = {}
        self.cost_samples: list[tuple[int, float]] = []  # (steps, meter seconds) along the run
        self._idle_f = sum(d.idle_w for d in devices)
        self._factor = sum(d.factor for d in devices) / len(devices)

    # -- helpers ------------------------------------------------------------------------------
    def load(self) -> int:
        return 4 * len(self.waiting) + len(self.running)

    def has_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _timed(self, fn: Callable, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            self.meter_s += time.perf_counter() - t

    def _collect_finals(self) -> None:
        for m in self._timed(_pop_final, self.meter):
            self.sim.deliver_final(m)

    def _free(self, r: SimRequest, aborted: bool) -> None:
        if r.status == "done":
            return
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        self.free_blocks += r.blocks
        r.blocks = 0
        r.status = "done"
        o = self.sim.outcomes[r.rid]
        o.aborted = aborted
        o.freed_s = self.sim.clock()
        o.preemptions = r.preemptions
        o.first = self._timed(self.meter.finished, r.rid, aborted=aborted)
        self.sim.n_done += 1

    # -- arrivals and aborts ------------------------------------------------------------------
    def arrive(self, r: SimRequest) -> None:
        r.status = "waiting"
        r.num_tokens = r.prompt_len
        r.engine = self.index
        self.waiting.append(r)
        self._kick()

    def abort(self, r: SimRequest) -> None:
        if r.status in ("waiting", "running") and r not in self.aborts:
            self.aborts.append(r)
            self._kick()

    def _process_aborts(self) -> None:
        due = [r for r in self.stop_pending if r.stop_abort_update is not None
               and r.stop_abort_update <= self.updates]
        for r in due:
            self.stop_pending.remove(r)
            if r.status != "done" and r not in self.aborts:
                self.aborts.append(r)
        aborts, self.aborts = self.aborts, []
        for r in aborts:
            self._free(r, aborted=True)

    def _kick(self) -> None:
        if not self.loop_pending and not self.queue:
            self.loop_pending = True
            self.idle_epoch += 1
            self.sim.at(self.sim.clock(), self._loop)

    # -- idle poller --------------------------------------------------------------------------
    def _start_idle(self) -> None:
        if self.cfg.idle_tick_s is None:
            return
        self.idle_epoch += 1
        epoch = self.idle_epoch
        lo, hi = self.cfg.idle_tick_s

        def tick() -> None:
            if epoch != self.idle_epoch or self.has_requests() or self.queue or self.loop_pending:
                return
            t = time.perf_counter()
            _idle_tick(self.meter)
            for m in _pop_final(self.meter):
                self.sim.deliver_final(m)
            self.meter_idle_s += time.perf_counter() - t
            self.idle_ticks += 1
            self.sim.at(self.sim.clock() + float(self.rng.uniform(lo, hi)), tick)

        self.sim.at(self.sim.clock() + float(self.rng.uniform(lo, hi)), tick)

    # -- the engine loop ----------------------------------------------------------------------
    def _loop(self) -> None:
        self.loop_pending = False
        self._process_aborts()  # input queue: aborts that arrived between steps
        qsize = 2 if self.cfg.async_scheduling else 1
        now = self.sim.clock()
        if self.has_requests() and len(self.queue) < qsize:
            self._schedule()
            now = self.sim.clock()
            if len(self.queue) < qsize and self.has_requests():
                self.loop_pending = True
                self.sim.at(now, self._loop)
                return
        if self.queue:
            key, start, end, _ = self.queue[0]
            self.loop_pending = True
            self.sim.at(max(now, end) + 1e-5, self._finish_oldest)
            return
        self._start_idle()

    def _schedule(self) -> None:
        cfg = self.cfg
        bs = cfg.block_size
        budget = cfg.max_num_batched_tokens
        sched: list[tuple[SimRequest, int]] = []
        preempted_any = False
        i = 0
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            n = min(r.num_tokens - r.num_computed, budget)
            if n <= 0:
                i += 1
                continue
            need = -(-(r.num_computed + n) // bs) - r.blocks
            while need > self.free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                preempted_any = True
                if victim is r:
                    break
            if r.status != "running":
                break  # preempted itself
            r.blocks += max(0, need)
            self.free_blocks -= max(0, need)
            sched.append((r, n))
            budget -= n
            i += 1
        if not preempted_any:
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                r = self.waiting[0]
                if not r.ever_scheduled:
                    hits = min(r.cached_prefix, r.prompt_len - 1) // bs * bs
                else:
                    hits = r.num_computed  # kept by _preempt (prefix-cache hit on resume)
                n = min(r.num_tokens - hits, budget)
                need = -(-(hits + n) // bs)
                if need > self.free_blocks:
                    break
                self.waiting.popleft()
                r.num_computed = hits
                r.blocks = need
                self.free_blocks -= need
                r.status = "running"
                r.ever_scheduled = True
                self.running.append(r)
                sched.append((r, n))
                budget -= n
        t_call = self.sim.clock()
        rows: list[tuple[str, str, int, int]] = []
        for r, n in sched:
            p0, P = r.num_computed, r.prompt_len
            n_pre = max(0, min(p0 + n, P) - p0)
            if n_pre:
                rows.append((r.rid, "prefill", n_pre, p0))
            if n - n_pre:
                rows.append((r.rid, "decode", n - n_pre, p0 + n_pre))
            r.num_computed = p0 + n
            if r.num_computed >= r.num_tokens:  # reaches the end: samples a token (placeholder)
                r.num_tokens += 1
        self.sim.clock.set(t_call + cfg.sched_cpu_s)
        key = self._next_key
        self._next_key += 1
        self._timed(self.meter.step_started, key, rows)
        if not rows:
            self.queue.append((key, self.sim.clock(), self.sim.clock(), {}))
            return
        start = max(self.sim.clock(), self.gpu_free_s)
        rec = self._commit(key, rows, start)
        self.gpu_free_s = rec.end_s
        self.queue.append((key, start, rec.end_s, {r.rid: r.epoch for r, _ in sched}))

    def _preempt(self, r: SimRequest) -> None:
        self._timed(self.meter.preempted, r.rid)
        self.running.remove(r)
        lo, hi = self.cfg.resume_hit_fraction
        bs = self.cfg.block_size
        # What stays in the prefix cache (block aligned; at least one token is recomputed).
        kept = int(r.num_computed * self.rng.uniform(lo, hi)) // bs * bs
        real_tokens = r.prompt_len + r.n_out
        kept = min(kept, (real_tokens - 1) // bs * bs)
        self.free_blocks += r.blocks
        r.blocks = 0
        r.num_computed = kept
        r.num_tokens = real_tokens  # placeholders dropped
        r.status = "waiting"
        r.preemptions += 1
        r.epoch += 1
        self.waiting.appendleft(r)

    def _commit(self, key: int, rows: list[tuple[str, str, int, int]], start: float) -> StepRecord:
        pm = self.pm
        n = np.fromiter((x[2] for x in rows), float, len(rows))
        ctx = np.fromiter((x[3] for x in rows), float, len(rows))
        flops, byts, e_rows = row_costs(pm, n, ctx)
        tp = self.cfg.tp
        t_c = float(flops.sum()) / (pm.peak_flops * tp)
        t_m = (pm.weight_bytes + float(byts.sum())) / (pm.mem_bw * tp)
        dur = pm.launch_s + max(t_c, t_m)
        e_rows = e_rows * np.exp(self.rng.normal(0.0, pm.row_noise, len(rows)))
        shared = pm.weight_bytes * pm.j_per_byte * float(np.exp(self.rng.normal(0.0, pm.step_noise)))
        end = start + dur
        for d in self.devices:
            d.add_busy(start, end, d.idle_w * dur + (shared + float(e_rows.sum())) / tp * d.factor)
        # Truth: rows' own parts + equal share (per request) of shared + idle baseline.
        f = self._factor
        tokens: dict[str, int] = {}
        for x in rows:
            tokens[x[0]] = tokens.get(x[0], 0) + x[2]
        share = (shared * f + self._idle_f * dur) / len(tokens)
        outs = self.sim.outcomes
        by_req: dict[str, float] = {}
        for x, e in zip(rows, e_rows.tolist()):
            rid = x[0]
            e_r = e * f + share * x[2] / tokens[rid]
            o = outs[rid]
            if x[1] == "prefill":
                o.truth_prefill_j += e_r
            else:
                o.truth_decode_j += e_r
            by_req[rid] = by_req.get(rid, 0.0) + e_r
        total = sum(d.idle_w * dur + (shared + float(e_rows.sum())) / tp * d.factor for d in self.devices)
        rec = StepRecord(key, rows, start, end, total, by_req)
        self.steps_by_key[key] = rec
        if self.keep_steps:
            self.step_log.append(rec)
        self.n_steps += 1
        return rec

    def _finish_oldest(self) -> None:
        self.loop_pending = False
        key, start, end, epochs = self.queue.popleft()
        self._process_aborts()  # _process_aborts_queue: before update_from_output
        self.sim.clock.set(max(self.sim.clock(), end + 1e-5))
        self._timed(self.meter.step_finished, key)
        rec = self.steps_by_key.pop(key, None)
        outs = self.sim.outcomes
        if rec is not None:
            for rid, e in rec.truth_by_req.items():
                if outs[rid].freed_s is not None:
                    outs[rid].truth_late_j += e
        self.updates += 1
        # update_from_output: tokens sampled in this step; finished requests are freed.
        reqs = self.sim.requests
        for rid, ep in epochs.items():
            r = reqs[rid]
            if r.status != "running" or r.epoch != ep:
                continue  # freed, or preempted since (stale output)
            if r.num_computed < r.prompt_len:
                continue  # a prefill chunk that did not reach the end of the prompt
            r.n_out += 1
            if r.n_out >= r.output_len:
                self._free(r, aborted=False)
            elif r.stop_at is not None and r.n_out == r.stop_at:
                r.stop_abort_update = self.updates + int(self.rng.integers(1, 3))
                self.stop_pending.append(r)
        self._collect_finals()
        self._sample_sizes()
        self.sim.clock.advance(self.cfg.update_cpu_s)
        self.loop_pending = True
        self.sim.at(self.sim.clock(), self._loop)

    def _sample_sizes(self) -> None:
        if self.updates % 64:
            return
        self.cost_samples.append((self.n_steps, self.meter_s))
        for owner, obj in (("meter", self.meter), ("attributor", self.meter.attributor)):
            for name, v in vars(obj).items():
                if isinstance(v, (dict, list, deque, set)):
                    k = f"{owner}.{name}"
                    if len(v) > self.max_sizes.get(k, 0):
                        self.max_sizes[k] = len(v)


# ----------------------------------------------------------------------------- simulation
def _first_last_us(samples: list[tuple[int, float]]) -> tuple[float, float]:
    if len(samples) < 8:
        return float("nan"), float("nan")
    q = len(samples) // 4
    (s0, c0), (s1, c1) = samples[0], samples[q]
    (s2, c2), (s3, c3) = samples[-1 - q], samples[-1]
    return (c1 - c0) / max(1, s1 - s0) * 1e6, (c3 - c2) / max(1, s3 - s2) * 1e6


@dataclass
class EngineStats:
    index: int
    steps: int
    total_energy_j: float
    idle_energy_j: float
    attributed_energy_j: float
    unreported_energy_j: float
    counters_delta_j: float
    true_energy_j: float  # integral of the true power up to the last read, all devices
    meter_us_per_step: float
    idle_ticks: int
    ghosts: int  # entries keyed by ids of finished requests left in the meter's dicts
    max_sizes: dict[str, int]
    final_sizes: dict[str, int]
    meter_us_first_last: tuple[float, float]  # per step over the first and last quarter of steps


@dataclass
class SimResult:
    outcomes: list[Outcome]
    engines: list[EngineStats]
    duplicates: int  # final values delivered more than once
    unknown_finals: int  # finals for ids never submitted
    sim_time_s: float
    wall_s: float
    step_logs: list[list[StepRecord]]


class Simulation:
    """A node: ``dp`` engine cores, each over its own ``tp`` devices, one simulated clock."""

    def __init__(self, cfg: EngineConfig | None = None, *, dp: int = 1, predictor: Any = None,
                 pm: PowerModel | None = None, seed: int = 0, keep_steps: bool = False,
                 read_indices: Callable[[int], Sequence[int]] | None = None) -> None:
        """Engine ``e``'s steps run on node devices ``e*tp .. e*tp+tp-1`` (vLLM's gpu_worker:
        ``dp_local_rank * world_size + local_rank``); its meter reads those, or the node devices
        ``read_indices(e)`` when given (to check a device-selection rule)."""
        self.cfg = cfg or EngineConfig()
        self.pm = pm or PowerModel()
        self.clock = ManualClock(0.0)
        self.rng = np.random.default_rng(seed)
        self.keep_steps = keep_steps
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.outcomes: dict[str, Outcome] = {}
        self.requests: dict[str, SimRequest] = {}
        self.n_done = 0
        self.duplicates = 0
        self.unknown_finals = 0
        if predictor is None:
            from llmco2_serve.prediction.predictor import Predictor
            predictor = Predictor.from_config(LLAMA_8B, gpu="h100")
        self.node_devices: list[SimDevice] = []
        c = self.cfg
        for i in range(dp * c.tp):
            self.node_devices.append(SimDevice(
                f"{i} Sim H100", self.rng.uniform(*c.idle_w), self.rng.uniform(*c.device_factor),
                self.rng.uniform(*c.update_period_s), c.period_jitter,
                self.rng.uniform(0.0, c.update_period_s[1]), 0.0, np.random.default_rng(seed * 1000 + i + 1)))
        self.engines = [SimEngine(self, e, c, self.node_devices[e * c.tp:(e + 1) * c.tp], predictor,
                                  np.random.default_rng(seed * 7919 + e),
                                  None if read_indices is None
                                  else [self.node_devices[i] for i in read_indices(e)])
                        for e in range(dp)]

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn))

    def deliver_final(self, m: Any) -> None:
        o = self.outcomes.get(m.request_id)
        if o is None:
            self.unknown_finals += 1
            return
        if o.finals:
            self.duplicates += 1
        o.finals.append(m)

    def run(self, requests: Sequence[SimRequest], *, drain_s: float = 2.0, warmup_idle_s: float = 1.0,
            max_sim_s: float = 1e6) -> SimResult:
        """Serve ``requests`` (their times are shifted by ``warmup_idle_s``: a server is idle,
        with its idle poller running, between start-up and its first request), then idle for
        ``drain_s`` so that every counter window closes."""
        wall = time.perf_counter()
        for r in requests:
            r.arrival_s += warmup_idle_s
            if r.abort_at_s is not None:
                r.abort_at_s += warmup_idle_s
            self.requests[r.rid] = r
            self.outcomes[r.rid] = Outcome(r.rid, -1, r.prompt_len, r.output_len)

            def arrive(r: SimRequest = r) -> None:
                eng = min(self.engines, key=lambda e: (e.load(), e.index))
                self.outcomes[r.rid].engine = eng.index
                eng.arrive(r)
            self.at(r.arrival_s, arrive)
            if r.abort_at_s is not None:
                self.at(r.abort_at_s, lambda r=r: self.engines[r.engine].abort(r) if r.engine >= 0 else None)
        for e in self.engines:
            e._start_idle()
        t_end = None
        while self._events:
            t, _, fn = heapq.heappop(self._events)
            if t_end is not None and t > t_end:
                break
            if t > max_sim_s:
                raise AssertionError("simulation ran past max_sim_s")
            self.clock.set(max(self.clock(), t))
            fn()
            if t_end is None and self.n_done == len(requests) and not any(e.queue for e in self.engines):
                t_end = self.clock() + drain_s
        for e in self.engines:
            e._collect_finals()
        return self._result(wall)

    def _result(self, wall: float) -> SimResult:
        stats = []
        done = {rid for rid, o in self.outcomes.items() if o.freed_s is not None}
        for e in self.engines:
            a = e.meter.attributor
            ghosts = 0
            final_sizes = {}
            for owner, obj in (("meter", e.meter), ("attributor", a)):
                for name, v in vars(obj).items():
                    if isinstance(v, (dict, list, deque, set)):
                        final_sizes[f"{owner}.{name}"] = len(v)
                    if isinstance(v, dict):  # ledger-like: request id -> an entry object
                        ghosts += sum(1 for k, x in v.items() if isinstance(k, str) and k in done
                                      and not isinstance(x, (int, float, str, bool, type(None))))
            t_last = self.clock()
            stats.append(EngineStats(
                e.index, e.n_steps, a.total_energy_j, a.idle_energy_j, a.attributed_energy_j,
                float(getattr(a, "unreported_energy_j", 0.0) or 0.0), e.reader.counters_delta_j(),
                sum(d.true_energy_j(t_last) for d in e.reader.devices),
                e.meter_s / max(1, e.n_steps) * 1e6, e.idle_ticks, ghosts, dict(e.max_sizes), final_sizes,
                _first_last_us(e.cost_samples)))
        return SimResult(list(self.outcomes.values()), stats, self.duplicates, self.unknown_finals,
                         self.clock(), time.perf_counter() - wall, [e.step_log for e in self.engines])


# ----------------------------------------------------------------------------- summaries
def rel_errors(outcomes: Sequence[Outcome], part: str = "total", *, min_truth_j: float = 0.0) -> np.ndarray:
    """|final - truth| / truth over requests with a final value and truth > min_truth_j."""
    errs = []
    for o in outcomes:
        m = o.final
        if m is None:
            continue
        truth = {"total": o.truth_j, "prefill": o.truth_prefill_j, "decode": o.truth_decode_j}[part]
        got = {"total": m.energy_j, "prefill": m.prefill_energy_j, "decode": m.decode_energy_j}[part]
        if truth > min_truth_j and got == got:
            errs.append(abs(got - truth) / truth)
    return np.asarray(errs)


def coverage(outcomes: Sequence[Outcome], k: float = 1.0) -> tuple[float, float]:
    """(share of finals with |E - truth| <= k * uncertainty, median uncertainty / energy)."""
    hit, rel_u = [], []
    for o in outcomes:
        m = o.final
        if m is None or not (m.energy_j == m.energy_j) or o.truth_j <= 0:
            continue
        hit.append(abs(m.energy_j - o.truth_j) <= k * m.uncertainty_j)
        rel_u.append(m.uncertainty_j / max(m.energy_j, 1e-12))
    if not hit:
        return float("nan"), float("nan")
    return float(np.mean(hit)), float(np.median(rel_u))


def summarize(res: SimResult) -> dict:
    outs = res.outcomes
    tot, pre, dec = rel_errors(outs, "total"), rel_errors(outs, "prefill", min_truth_j=0.0), \
        rel_errors(outs, "decode")
    cov, rel_u = coverage(outs)

    def q(a: np.ndarray, p: float) -> float:
        return float(np.percentile(a, p)) if len(a) else float("nan")

    firsts = [o.first for o in outs if o.first is not None]
    return {
        "requests": len(outs),
        "with_final": sum(1 for o in outs if o.finals),
        "total_med": q(tot, 50), "total_p90": q(tot, 90),
        "prefill_med": q(pre, 50), "prefill_p90": q(pre, 90),
        "decode_med": q(dec, 50), "decode_p90": q(dec, 90),
        "coverage_1x": cov, "median_rel_u": rel_u,
        "first_final_share": (sum(1 for m in firsts if m.final) / len(firsts)) if firsts else float("nan"),
        "ghosts": sum(e.ghosts for e in res.engines),
        "idle_err": sum(e.idle_energy_j - (e.counters_delta_j - sum(o.truth_j for o in outs if o.engine == e.index))
                        for e in res.engines) / max(1e-9, sum(e.total_energy_j for e in res.engines)),
        "conservation_err_j": max(abs(sum(o.final.energy_j for o in outs if o.final is not None and o.engine == e.index
                                          and o.final.energy_j == o.final.energy_j)
                                      + e.idle_energy_j + e.unreported_energy_j - e.total_energy_j)
                                  for e in res.engines),
        "unreported_j": sum(e.unreported_energy_j for e in res.engines),
        "meter_us_first": float(np.nanmean([e.meter_us_first_last[0] for e in res.engines])),
        "meter_us_last": float(np.nanmean([e.meter_us_first_last[1] for e in res.engines])),
        "duplicates": res.duplicates,
        "meter_us_per_step": float(np.mean([e.meter_us_per_step for e in res.engines])),
        "steps": sum(e.steps for e in res.engines),
        "sim_s": res.sim_time_s, "wall_s": res.wall_s,
    }
