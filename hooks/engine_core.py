"""Engine-core patches: per-step rows into an :class:`EngineMeter`, measured energy out on the
final :class:`EngineCoreOutput` (ledger entries ``scheduler.*`` in ``_patches.py``)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from llmco2_serve.gpu_energy import EnergyReaderError, NullEnergyReader, open_energy_reader
from llmco2_serve.engine_meter import EngineMeter
from llmco2_serve.service import MEASURED_HEADER, encode_measured, make_predictor

from . import _state
from ._patches import apply, failed, log_once

logger = logging.getLogger("vllm.llmco2")

_ATTR = "_llmco2_engine"
_MAX_WAITING_HEADERS = 8192


class EngineSide:
    """One per scheduler per process: the meter and the measurements waiting for their output."""

    def __init__(self, scheduler: Any) -> None:
        from ._vllm_config import model_info

        self.pid = os.getpid()
        settings = _state.settings()
        self.enabled = settings is not None and settings.enabled
        self.headers: dict[str, str] = {}
        self.meter: EngineMeter | None = None
        if not self.enabled:
            return
        info = model_info(scheduler.vllm_config)
        mode = settings.energy_reader_mode
        try:
            reader = open_energy_reader(mode, list(range(info.n_gpu)) if mode in ("auto", "nvml") else None,
                                        cpu_estimate=mode == "cpu-estimate")
        except (EnergyReaderError, ValueError) as e:
            log_once("reader", logging.WARNING, "llmco2: energy reader %r failed (%s); measurements unavailable",
                     mode, e)
            reader = NullEnergyReader(str(e))
        log_once("engine", logging.INFO, "llmco2 engine core (pid %d): energy source %s on %s", self.pid,
                 reader.source, ", ".join(reader.device_names()) or "no device")
        if reader.source == "unavailable":
            # Nothing to attribute: keep the step loop untouched; spans say "unavailable".
            return
        self.meter = EngineMeter(reader)
        gpu_names = [n.split(" ", 1)[-1] for n in reader.device_names()] if reader.source == "nvml" else []
        # The predictor only refines step weights; building it imports the GNN stack (seconds),
        # so it happens off the step loop. Until then weights are token counts.
        threading.Thread(target=self._build_predictor, args=(settings, info, gpu_names),
                         name="llmco2-predictor", daemon=True).start()

    def _build_predictor(self, settings: Any, info: Any, gpu_names: list[str]) -> None:
        choice = make_predictor(settings, info, gpu_names)
        if choice.predictor is not None and self.meter is not None:
            self.meter.set_predictor(choice.predictor)


class _Disabled:
    meter = None
    headers: dict[str, str] = {}

    def __init__(self) -> None:
        self.pid = os.getpid()


def engine_side(scheduler: Any) -> EngineSide | _Disabled:
    side = scheduler.__dict__.get(_ATTR)
    if side is None or side.pid != os.getpid():
        try:
            side = EngineSide(scheduler)
        except Exception as e:  # noqa: BLE001 - fail-open boundary: set-up failed, meter off for good
            failed("scheduler.schedule", e)
            side = _Disabled()
        scheduler.__dict__[_ATTR] = side
    return side


def step_rows(scheduler: Any, so: Any) -> list[tuple[str, str, int, int]]:
    """(request id, phase, new tokens, context before the step) of every scheduled request."""
    spec = so.scheduled_spec_decode_tokens or {}
    requests = scheduler.requests
    rows = []
    for rid, n in so.num_scheduled_tokens.items():
        req = requests.get(rid)
        if req is None or n < 1:
            continue
        before = req.num_computed_tokens - n  # schedule() already advanced it
        decode = before >= req.num_prompt_tokens and n == 1 + len(spec.get(rid, ()))
        rows.append((rid, "decode" if decode else "prefill", int(n), max(0, int(before))))
    return rows


# ------------------------------------------------------------------------------- wrappers
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
        if side is not None and side.headers:
            try:
                _attach_headers(side, outputs)
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
                aborted = getattr(request.status, "name", "") == "FINISHED_ABORTED"
                measured = side.meter.finished(request.request_id, aborted=aborted)
                if not aborted:  # an aborted request gets no final output to carry it
                    side.headers[request.request_id] = encode_measured(measured, request.num_output_tokens)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("scheduler._free_request", e)
        return orig(self, request, *args, **kwargs)
    return _free_request


def install() -> list[str]:
    """Apply the scheduler patches; returns the names that applied."""
    done = []
    for name, make in (("scheduler.schedule", _wrap_schedule),
                       ("scheduler.update_from_output", _wrap_update_from_output),
                       ("scheduler._preempt_request", _wrap_preempt),
                       ("scheduler._free_request", _wrap_free)):
        if apply(name, make):
            done.append(name)
    return done
