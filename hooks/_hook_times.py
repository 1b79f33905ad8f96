"""DEV-ONLY: thread CPU time of every patch, split into the plugin's part and vLLM's, in a real server.

Off unless ``LLMCO2_DEV_HOOK_TIMES`` names a file prefix when the patches are applied; off, nothing
here runs (``_patches.apply`` installs the wrappers as they are). On, ``_patches.apply`` times
each wrapper and the vLLM original it calls (:func:`timed`, ``time.thread_time``: CPU time of the
calling thread, so waiting and other processes on a shared machine do not count), the engine
core's poller times its reads, garbage collections are timed by generation (``gc:genN``), and
every process writes its totals to ``PREFIX.PID.json`` twice a
second: ``{"pid", "comm", "hooks": {name: [calls, cpu_s]}, "process_cpu_s"}`` (the last: the
process's CPU time, all threads). The plugin's own cost of a patch is
``name`` minus ``name:vllm`` (nested patches, such as ``scheduler._free_request`` inside
``scheduler.update_from_output``, count in their own line and inside the outer one's vLLM part).

Why: the isolated benchmarks (``benchmarks/hook_overhead.py``) drive the hooks with a simulated
step pattern; a served load can differ (one-token requests finish while their step still waits for
the poller) and py-spy's samples on a busy 2-core machine count runnable-but-waiting threads as
busy. ``benchmarks/hook_costs_in_server.py`` reads these files around a load. Counts are plain
``+=`` under the GIL: two threads in the same hook at once may lose an increment (a dev tool).
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

ENV = "LLMCO2_DEV_HOOK_TIMES"
_totals: dict[str, list] = {}
_writer: threading.Thread | None = None
_lock = threading.Lock()


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its calls and thread CPU time added to ``name``'s totals."""
    _start_writer()
    entry = _totals.setdefault(name, [0, 0.0])
    clock = time.thread_time

    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            entry[1] += clock() - t0
            entry[0] += 1

    call.__name__ = getattr(fn, "__name__", "call")
    call.__qualname__ = getattr(fn, "__qualname__", "call")
    return call


def _gc_callback(phase: str, info: dict) -> None:
    # The collector runs in whichever thread allocated past the threshold: its thread CPU time
    # between "start" and "stop" is the collection's cost, by generation ("gc:gen0" ...).
    global _gc_t0
    if phase == "start":
        _gc_t0 = time.thread_time()
        return
    entry = _totals.setdefault(f"gc:gen{info.get('generation', '?')}", [0, 0.0])
    entry[1] += time.thread_time() - _gc_t0
    entry[0] += 1


_gc_t0 = 0.0


def time_gc() -> None:
    """Time this process's garbage collections too (once per process: the plugin's registration,
    which runs in every vLLM process, calls it, the plugin on or off)."""
    if _gc_callback not in gc.callbacks:
        gc.callbacks.append(_gc_callback)
        _start_writer()


def snapshot() -> dict[str, Any]:
    try:
        with open("/proc/self/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = ""
    return {"pid": os.getpid(), "comm": comm, "hooks": {k: list(v) for k, v in _totals.items()},
            "process_cpu_s": time.process_time()}


def _start_writer() -> None:
    global _writer
    with _lock:
        if _writer is not None and _writer.is_alive():
            return
        prefix = os.environ.get(ENV, "")
        _writer = threading.Thread(target=_write_loop, args=(prefix,), name="llmco2-hook-times", daemon=True)
        _writer.start()


def _after_fork_in_child() -> None:
    """A forked engine core inherits the patches (already timed) but not the writer thread, and
    starts from zero: its totals are its own."""
    global _writer
    for entry in _totals.values():
        entry[0], entry[1] = 0, 0.0
    _writer = None
    if _totals and enabled():
        _start_writer()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _write_loop(prefix: str) -> None:
    path = f"{prefix}.{os.getpid()}.json"
    while True:
        time.sleep(0.5)
        try:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(snapshot(), f)
            os.replace(tmp, path)  # a reader never sees half a file
        except OSError:
            return
