"""Engine-core patches: per-step rows into an :class:`EngineMeter`, measured energy out to the API
server (ledger entries ``scheduler.*`` and ``engine_core.run_busy_loop`` in ``_patches.py``).

Two messages go out, both inside vLLM's own ``EngineCoreOutputs`` (no side channel):

* the *first answer* of a finished request, on its final ``EngineCoreOutput.trace_headers``
  (``x-llmco2-measured``), so the request's span carries it (``final`` false when part of it is
  an open-window estimate);
* *final values* of every finished request (aborted ones and stop-string finishes too) plus the
  engine's energy books (counters' total, idle, unreported, per GPU) and, with the books, merged
  counter windows for the API server's calibrator (``runtime/windows.py``), on a synthetic output with
  request id ``llmco2-finals`` (``x-llmco2-finals``). vLLM's output processor ignores outputs of
  unknown request ids; the API-side patch strips it before vLLM sees it. They ride on the step's
  outputs while the engine is busy, and an idle poller thread (started with the busy loop) puts
  them on the engine's output queue while it is idle, after reading the counters at a bounded rate
  (vLLM's ``step()`` returns before ``schedule()`` when there is no request, so nothing else would).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from llmco2_serve.hardware.devices import engine_device_indices
from llmco2_serve.runtime.engine_meter import EngineMeter
from llmco2_serve.hardware.gpu_energy import EnergyReaderError, NullEnergyReader, open_energy_reader
from llmco2_serve.runtime.service import (
    FINALS_HEADER, FINALS_REQUEST_ID, MEASURED_HEADER, encode_measured, json_number, make_predictor,
)

from . import _hook_times, _state
from ._vllm_config import vllm_version
from ._patches import apply, failed, log_once

logger = logging.getLogger("vllm.llmco2")

_ATTR = "_llmco2_engine"


class FailClosedError(RuntimeError):
    """LLMCO2_FAIL_OPEN=0 and something the settings name cannot be had: vLLM must not start."""

_MAX_WAITING_HEADERS = 8192
_MAX_CLIENT_IDS = 65536
_IDLE_POLL_S = 0.1  # idle reads: 10 per second, off the step path
_BOOKS_EVERY_S = 1.0  # engine books ride along at most this often when there is no final value
# Behind several API servers the engine counts its requests per API server every this many steps
# (O(requests) each time): their mean over the steps between two books messages is engine_load.
_LOAD_SAMPLE_STEPS = 8


def _self_check() -> str | None:
    """The private vLLM fields the patches rely on; None when all are there."""
    import dataclasses

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    missing = []
    names = {f.name for f in dataclasses.fields(SchedulerOutput)}
    for f in ("num_scheduled_tokens", "scheduled_spec_decode_tokens"):
        if f not in names:
            missing.append(f"SchedulerOutput.{f}")
    for cls, f in ((EngineCoreOutput, "trace_headers"), (EngineCoreOutputs, "outputs")):
        if f not in getattr(cls, "__struct_fields__", ()):
            missing.append(f"{cls.__name__}.{f}")
    return ", ".join(missing) or None


class EngineSide:
    """One per scheduler per process: the meter, first answers waiting for their output, client
    indices of finished requests, and the idle poller."""

    def __init__(self, scheduler: Any) -> None:
        from ._vllm_config import model_info

        self.pid = os.getpid()
        settings = _state.settings()
        self.enabled = settings is not None and settings.enabled
        self.headers: dict[str, str] = {}
        # request id -> (client index, cached prompt tokens, output tokens) of finished requests
        self.clients: dict[str, tuple[int, int | None, int | None]] = {}
        self.meter: EngineMeter | None = None
        # vLLM's Scheduler.requests (id -> Request, waiting and running): the engine's load per API
        # server (Request.client_index). None where a vLLM lacks it: engine_load is not sent.
        reqs = getattr(scheduler, "requests", None)
        self._requests: dict | None = reqs if isinstance(reqs, dict) else None
        self._steps = 0
        self._load_sums: dict[int, int] = {}  # API server -> its requests summed over the samples
        self._load_samples = 0
        self.source_suffix = ""
        self.engine_index = 0
        self._output_queue: Any = None
        self._books_t = 0.0
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._client_indices: set[int] = {0}  # API servers (client indices) this engine has answered
        if not self.enabled:
            return
        problem = _self_check()
        if problem:
            log_once("selfcheck", logging.WARNING, "llmco2: vLLM %s lacks %s; measurement off", vllm_version(), problem)
            return
        vc = scheduler.vllm_config
        info = model_info(vc)
        pc = vc.parallel_config
        self.engine_index = int(getattr(pc, "data_parallel_index", 0) or getattr(pc, "data_parallel_rank", 0) or 0)
        selection = engine_device_indices(
            tensor_parallel=int(pc.tensor_parallel_size), pipeline_parallel=int(pc.pipeline_parallel_size),
            prefill_context_parallel=int(getattr(pc, "prefill_context_parallel_size", 1) or 1),
            dp_local_rank=getattr(pc, "data_parallel_rank_local", None)
            if getattr(pc, "data_parallel_rank_local", None) is not None else getattr(pc, "data_parallel_index", 0),
            nnodes_within_dp=int(getattr(pc, "nnodes_within_dp", 1) or 1),
            executor_backend=str(getattr(pc, "distributed_executor_backend", "mp") or "mp"))
        mode = settings.energy_reader_mode
        try:
            if mode in ("auto", "nvml") and not selection.indices:
                raise EnergyReaderError(selection.note)
            reader = open_energy_reader(mode, list(selection.indices) if mode in ("auto", "nvml") else None,
                                        cpu_estimate=mode == "cpu-estimate",
                                        fake_power_w=(settings.fake_idle_w, settings.fake_busy_w))
        except (EnergyReaderError, ValueError) as e:
            if not settings.fail_open:
                raise FailClosedError(f"llmco2 (LLMCO2_FAIL_OPEN=0): energy reader {mode!r} failed: {e}") from e
            log_once("reader", logging.WARNING, "llmco2: energy reader %r failed (%s); measurements unavailable",
                     mode, e)
            reader = NullEnergyReader(str(e))
        if reader.source == "nvml":
            if not selection.complete:
                self.source_suffix = "-partial"
            shared = getattr(reader, "sharing_note", lambda: None)()
            if shared:
                self.source_suffix = "-shared"
                log_once("shared", logging.WARNING, "llmco2: %s; measured values are labelled nvml-shared", shared)
        log_once("engine", logging.INFO, "llmco2 engine core (pid %d, engine %d): energy source %s%s on %s%s",
                 self.pid, self.engine_index, reader.source, self.source_suffix,
                 ", ".join(reader.device_names()) or "no device",
                 f" ({selection.note})" if selection.note else "")
        if reader.source == "unavailable":
            # Nothing to attribute: keep the step loop untouched; spans say "unavailable".
            return
        self.meter = EngineMeter(reader, background_reads=True)
        gpu_names = [n.split(" ", 1)[-1] for n in reader.device_names()] if reader.source == "nvml" else []
        # The predictor only refines row weights; building it imports the GNN stack (seconds), so it
        # happens off the step loop, at engine start-up. Until then weights are token counts.
        threading.Thread(target=self._build_predictor, args=(settings, info, gpu_names),
                         name="llmco2-predictor", daemon=True).start()
        # Idle reads from start-up on: the engine is idle now, so this also measures idle power.
        self._poller = threading.Thread(target=self._idle_loop, name="llmco2-idle-poller", daemon=True)
        self._poller.start()

    def _build_predictor(self, settings: Any, info: Any, gpu_names: list[str]) -> None:
        choice = make_predictor(settings, info, gpu_names)
        if choice.predictor is not None and self.meter is not None:
            self.meter.set_predictor(choice.predictor)
            if settings.weights_path and settings.reload_interval_s > 0:
                self._watch_weights(settings.weights_path, settings.reload_interval_s)

    def _watch_weights(self, path: str, interval_s: float) -> None:
        """The API server hot-reloads LLMCO2_WEIGHTS (service.reload_weights); the engine core
        follows on this thread, off the step loop, so that its step pricing, and with it the
        counter windows sent to the calibrator, carry the new weights' label (a window priced by
        other weights is refused there). Old weights stay on any error (logged once per file)."""
        import dataclasses

        from llmco2_serve.prediction.predictor import WeightsBeingReplaced, file_signature, read_weights_file

        seen = file_signature(path)
        last_error = None
        while not self._stop.wait(interval_s):
            sig = file_signature(path)
            meter = self.meter
            if sig is None or sig == seen or meter is None:
                continue
            old = meter.predictor
            try:
                meter.set_predictor(dataclasses.replace(old, weights=read_weights_file(path)))
            except WeightsBeingReplaced:
                continue  # mid-publication: the next look sees the finished pair
            except Exception as e:  # noqa: BLE001 - fail-open: the engine keeps its weights and serves
                seen = sig
                if str(e) != last_error:
                    logger.warning("llmco2 engine core: cannot reload GNN weights from %s (%s: %s); keeping %s",
                                   path, type(e).__name__, e, meter.predictor_label)
                last_error = str(e)
                continue
            seen = sig
            logger.info("llmco2 engine core (pid %d, engine %d): step pricing reloaded from %s: %s",
                        self.pid, self.engine_index, path, meter.predictor_label)

    # ------------------------------------------------------------------ finals out
    def attach_output_queue(self, output_queue: Any, engine_index: int) -> None:
        self._output_queue = output_queue
        self.engine_index = int(engine_index)

    def finals_message(self, force_books: bool = False) -> dict[int, str]:
        """client index -> JSON of final values (and the engine's books), {} when nothing to say."""
        meter = self.meter
        if meter is None:
            return {}
        finals = meter.pop_final()
        now = time.monotonic()
        books_due = force_books or now - self._books_t >= _BOOKS_EVERY_S
        if not finals and not books_due:
            return {}
        by_client: dict[int, list[list[Any]]] = {}
        suffix = self.source_suffix
        for m in finals:
            client, cached, gen = self.clients.pop(m.request_id, (0, None, None))
            src = m.source + suffix if suffix and m.source not in ("unavailable",) else m.source
            by_client.setdefault(client, []).append([
                m.request_id, json_number(m.prefill_energy_j), json_number(m.decode_energy_j), json_number(m.uncertainty_j),
                json_number(m.estimated_energy_j), src, m.n_steps, m.n_preemptions, bool(m.aborted),
                round(m.mean_batch, 3), cached, gen])
        if len(self.clients) > _MAX_CLIENT_IDS:  # never delivered (should not happen): bound it
            for rid in list(self.clients)[: len(self.clients) - _MAX_CLIENT_IDS]:
                del self.clients[rid]
        out = {}
        books = None
        if books_due:
            self._books_t = now
            t = meter.totals()
            books = {"engine": self.engine_index, "source": meter.source + suffix, "devices": t["devices"],
                     "total_j": t["per_device_total_j"], "idle_j": t["per_device_idle_j"],
                     "unreported_j": t["unreported_j"], "live": t["live"], "pending": t["pending"]}
        # Merged counter windows (calibration observations, runtime/windows.py) ride with the books:
        # about one message a second, at most MAX_PER_MESSAGE rows. The books go to API server 0 only
        # (its metrics count the engine once); the windows to every API server this engine has
        # served (--api-server-count > 1), since each has its own calibrator.
        self._client_indices.update(by_client)
        load = self._mean_load() if books is not None else None
        load_total = sum(load.values()) if load is not None else 0.0
        wins = meter.pop_windows() if books is not None else ()
        windows = ({"source": books["source"], "predictor": meter.predictor_label,
                    "rows": [w.to_row() for w in wins]} if wins else None)
        for client in (self._client_indices if books is not None else by_client):
            msg: dict[str, Any] = {"finals": by_client.get(client, [])}
            if books is not None:
                if load is not None:
                    # The requests this engine held from the other API servers (--api-server-count
                    # > 1; an API server counts only its own) and in all (EnergyService.on_engine_load).
                    msg["engine_load"] = [self.engine_index, round(load_total - load.get(client, 0.0), 2),
                                          round(load_total, 2)]
                if client == 0:
                    msg["books"] = books
            if windows:
                msg["windows"] = windows
            if msg["finals"] or len(msg) > 1:
                out[client] = json.dumps(msg, separators=(",", ":"))
        return out

    def sample_load(self) -> None:
        """Called once per step (the step thread): every ``_LOAD_SAMPLE_STEPS``-th step, the
        requests held per API server, when this engine serves more than one."""
        if len(self._client_indices) < 2:  # one API server counts every request itself
            return
        self._steps += 1
        if self._steps % _LOAD_SAMPLE_STEPS:
            return
        load = self._load_by_client()
        if load is None:
            return
        sums = self._load_sums
        for c, k in load.items():
            sums[c] = sums.get(c, 0) + k
        self._load_samples += 1

    def _mean_load(self) -> dict[int, float] | None:
        """API server -> mean requests the engine held from it over the steps sampled since the
        last call (a step mean, like a request's mean_batch: an instant between two waves of
        arrivals would say 0); the requests now when no step was sampled (idle: no steps)."""
        now = self._load_by_client()
        if now:
            self._client_indices.update(now)
        sums, n = self._load_sums, self._load_samples
        self._load_sums, self._load_samples = {}, 0
        if n:
            return {c: k / n for c, k in sums.items()}
        return None if now is None else {c: float(k) for c, k in now.items()}

    def _load_by_client(self) -> dict[int, int] | None:
        """API server (client index) -> requests the scheduler holds from it (waiting or running);
        None when unknown. Per books message (about a second) and, behind several API servers,
        every ``_LOAD_SAMPLE_STEPS``-th step."""
        if self._requests is None:
            return None
        load: dict[int, int] = {}
        try:
            # list() copies the dict in one go (no Python code runs meanwhile): the idle poller may
            # call this while the step thread adds a request
            for req in list(self._requests.values()):
                c = int(getattr(req, "client_index", 0) or 0)
                load[c] = load.get(c, 0) + 1
        except Exception as e:  # noqa: BLE001 - fail-open: predictions fall back to their own count
            failed("scheduler.update_from_output", e)
            return None
        return load

    def _idle_loop(self) -> None:
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

        try:  # the engine is idle at start-up: measure the counters' real update period first
            meter = self.meter
            if meter is not None and meter.source in ("nvml", "fake"):
                period = meter.measure_update_period()
                log_once("period", logging.INFO, "llmco2 engine core: counter update period %s",
                         f"{period * 1e3:.1f} ms (measured)" if period else
                         f"not measured (counters did not move), {meter.attributor.update_period_s * 1e3:.0f} ms assumed")
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("engine_core.run_busy_loop", e)
        service_reads = EngineMeter.service_reads
        if _hook_times.enabled():  # DEV-ONLY: the poller's CPU time (LLMCO2_DEV_HOOK_TIMES)
            service_reads = _hook_times.timed("engine_core.poller", service_reads)
        while not self._stop.is_set():
            try:
                meter = self.meter
                if meter is None:
                    self._stop.wait(_IDLE_POLL_S)
                    continue
                if service_reads(meter, _IDLE_POLL_S):  # busy: the reads the step thread flagged
                    continue
                if not meter.idle_tick():
                    continue
                q = self._output_queue
                if q is None:
                    continue
                for client, text in self.finals_message().items():
                    out = EngineCoreOutput(request_id=FINALS_REQUEST_ID, new_token_ids=[],
                                           trace_headers={FINALS_HEADER: text})
                    q.put_nowait((client, EngineCoreOutputs(engine_index=self.engine_index, outputs=[out])))
            except Exception as e:  # noqa: BLE001 - fail-open boundary: the poller never takes the engine down
                failed("engine_core.run_busy_loop", e)


class _Disabled:
    meter = None
    headers: dict[str, str] = {}
    clients: dict[str, tuple] = {}

    def __init__(self) -> None:
        self.pid = os.getpid()

    def finals_message(self, force_books: bool = False) -> dict[int, str]:
        return {}

    def attach_output_queue(self, output_queue: Any, engine_index: int) -> None:
        pass


def engine_side(scheduler: Any) -> EngineSide | _Disabled:
    side = scheduler.__dict__.get(_ATTR)
    if side is None or side.pid != os.getpid():
        try:
            side = EngineSide(scheduler)
        except FailClosedError:
            raise  # fail-closed (LLMCO2_FAIL_OPEN=0): refuse to start, with the reason
        except Exception as e:  # noqa: BLE001 - fail-open boundary: set-up failed, meter off for good
            failed("scheduler.schedule", e)
            side = _Disabled()
        scheduler.__dict__[_ATTR] = side
    return side


def step_rows(scheduler: Any, so: Any) -> list[tuple[str, str, int, int]]:
    """(request id, phase, new tokens, context before the step) of every scheduled request.

    The phase is decided by token position: positions before ``num_prompt_tokens`` are prefill,
    later ones decode. A resumed request (after preemption) recomputes only what missed the prefix
    cache; a chunk that straddles the end of the prompt becomes two rows.
    """
    requests = scheduler.requests
    rows = []
    for rid, n in so.num_scheduled_tokens.items():
        req = requests.get(rid)
        if req is None or n < 1:
            continue
        before = req.num_computed_tokens - n  # schedule() already advanced it
        if before < 0:
            before = 0
        prompt = req.num_prompt_tokens
        if before >= prompt:
            rows.append((rid, "decode", n, before))
        elif before + n <= prompt:
            rows.append((rid, "prefill", n, before))
        else:
            k = prompt - before
            rows.append((rid, "prefill", k, before))
            rows.append((rid, "decode", n - k, prompt))
    return rows


# ------------------------------------------------------------------------------- wrappers
def _wrap_init(orig):
    def __init__(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        try:
            engine_side(self)  # NVML, the reader and the idle poller at engine start, not on a request
        except FailClosedError:
            raise
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("scheduler.__init__", e)
    return __init__


def _wrap_schedule(orig):
    def schedule(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        try:
            side = engine_side(self)
            if side.meter is not None:
                side.meter.step_started(id(out), step_rows(self, out))
        except Exception as e:  # noqa: BLE001 - fail-open boundary: never break the engine loop
            failed("scheduler.schedule", e)
        return out
    return schedule


def _wrap_update_from_output(orig):
    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        side = None
        try:
            side = engine_side(self)
            if side.meter is not None:
                side.meter.step_finished(id(scheduler_output))
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("scheduler.update_from_output", e)
        outputs = orig(self, scheduler_output, model_runner_output, *args, **kwargs)
        if side is not None and side.meter is not None:
            try:
                if side.headers:
                    _attach_headers(side, outputs)
                side.sample_load()
                _attach_finals(side, outputs)
            except Exception as e:  # noqa: BLE001 - fail-open boundary
                failed("scheduler.update_from_output", e)
        return outputs
    return update_from_output


def _attach_headers(side: EngineSide, outputs: Any) -> None:
    headers = side.headers
    for eco in outputs.values():
        for o in eco.outputs:
            if o.finish_reason is not None:
                h = headers.pop(o.request_id, None)
                if h is not None:
                    o.trace_headers = {**(o.trace_headers or {}), MEASURED_HEADER: h}
    if len(headers) > _MAX_WAITING_HEADERS:  # finished without a final output (e.g. errors)
        for rid in list(headers)[: len(headers) - _MAX_WAITING_HEADERS]:
            del headers[rid]


def _attach_finals(side: EngineSide, outputs: Any) -> None:
    msgs = side.finals_message()
    if not msgs:
        return
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

    for client, text in msgs.items():
        eco = outputs.get(client)
        if eco is None:
            eco = outputs[client] = EngineCoreOutputs()
        eco.outputs.append(EngineCoreOutput(request_id=FINALS_REQUEST_ID, new_token_ids=[],
                                            trace_headers={FINALS_HEADER: text}))


def _wrap_preempt(orig):
    def _preempt_request(self, request, *args, **kwargs):
        try:
            side = engine_side(self)
            if side.meter is not None:
                side.meter.preempted(request.request_id)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("scheduler._preempt_request", e)
        return orig(self, request, *args, **kwargs)
    return _preempt_request


def _wrap_free(orig):
    def _free_request(self, request, *args, **kwargs):
        try:
            side = engine_side(self)
            if side.meter is not None:
                rid = request.request_id
                aborted = getattr(request.status, "name", "") == "FINISHED_ABORTED"
                cached = getattr(request, "num_cached_tokens", None)
                side.clients[rid] = (int(getattr(request, "client_index", 0) or 0),
                                     int(cached) if isinstance(cached, int) and cached >= 0 else None,
                                     int(request.num_output_tokens))
                measured = side.meter.finished(rid, aborted=aborted)
                if not aborted:  # an aborted request gets no final output: its value comes as a final
                    side.headers[rid] = encode_measured(measured, request.num_output_tokens,
                                                        side.source_suffix)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("scheduler._free_request", e)
        return orig(self, request, *args, **kwargs)
    return _free_request


def _wrap_busy_loop(orig):
    def run_busy_loop(self, *args, **kwargs):
        try:
            side = engine_side(self.scheduler)
            side.attach_output_queue(self.output_queue, getattr(self, "engine_index", 0))
        except FailClosedError:
            raise
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("engine_core.run_busy_loop", e)
        return orig(self, *args, **kwargs)
    return run_busy_loop


def install() -> list[str]:
    """Apply the engine-core patches; returns the names that applied."""
    done = []
    for name, make in (("scheduler.__init__", _wrap_init),
                       ("scheduler.schedule", _wrap_schedule),
                       ("scheduler.update_from_output", _wrap_update_from_output),
                       ("scheduler._preempt_request", _wrap_preempt),
                       ("scheduler._free_request", _wrap_free),
                       ("engine_core.run_busy_loop", _wrap_busy_loop),
                       ("engine_core.dp_run_busy_loop", _wrap_busy_loop)):
        if apply(name, make):
            done.append(name)
    return done
