"""DEV-ONLY hook timing (hooks/_hook_times.py): thread CPU time, not wall time; files a reader can
trust; a forked child starts from zero. Truth: ``time.sleep`` uses no CPU and a busy loop uses
its wall time (on an idle enough core; the bounds leave room for a shared machine)."""

from __future__ import annotations

import json
import os
import time

import pytest

from llmco2_serve.hooks import _hook_times


def _busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_timed_counts_cpu_time_not_waiting_and_the_file_says_so(tmp_path, monkeypatch):
    prefix = tmp_path / "times"
    monkeypatch.setenv(_hook_times.ENV, str(prefix))
    monkeypatch.setattr(_hook_times, "_totals", {})
    monkeypatch.setattr(_hook_times, "_writer", None)
    busy = _hook_times.timed("test.busy", _busy)
    sleepy = _hook_times.timed("test.sleep", time.sleep)
    for _ in range(3):
        busy(0.02)
        sleepy(0.05)
    calls_busy, cpu_busy = _hook_times._totals["test.busy"]
    calls_sleep, cpu_sleep = _hook_times._totals["test.sleep"]
    assert calls_busy == 3 and calls_sleep == 3
    assert 0.06 <= cpu_busy < 0.1  # its own CPU time
    assert cpu_sleep < 0.01  # 150 ms of sleeping is not CPU time
    path = tmp_path / f"times.{os.getpid()}.json"
    deadline = time.monotonic() + 5.0
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    snap = json.loads(path.read_text())  # written whole (os.replace), never half a file
    assert snap["pid"] == os.getpid()
    assert snap["hooks"]["test.busy"][0] == 3 and snap["hooks"]["test.busy"][1] == pytest.approx(cpu_busy)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_from_zero(monkeypatch, tmp_path):
    monkeypatch.setenv(_hook_times.ENV, str(tmp_path / "times"))
    monkeypatch.setattr(_hook_times, "_totals", {})
    monkeypatch.setattr(_hook_times, "_writer", None)
    busy = _hook_times.timed("test.busy", _busy)
    busy(0.01)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: inherited the wrapper and the parent's totals; must report only its own
        try:
            busy(0.01)
            os.write(write_fd, json.dumps(_hook_times.snapshot()["hooks"]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    child = json.loads(os.read(read_fd, 65536).decode())
    os.waitpid(pid, 0)
    assert child["test.busy"][0] == 1  # the parent's call is not in the child's totals
    assert _hook_times._totals["test.busy"][0] == 1  # nor the child's in the parent's


def test_garbage_collections_are_timed_by_generation(monkeypatch, tmp_path):
    import gc

    monkeypatch.setenv(_hook_times.ENV, str(tmp_path / "times"))
    monkeypatch.setattr(_hook_times, "_totals", {})
    monkeypatch.setattr(_hook_times, "_writer", None)
    _hook_times.time_gc()
    _hook_times.time_gc()  # once per process, however often it is asked
    try:
        assert gc.callbacks.count(_hook_times._gc_callback) == 1
        # a full collection over a heap with many objects takes measurable CPU time
        junk = [[i] for i in range(300_000)]
        gc.collect(2)
        gc.collect(2)
        del junk
        calls, cpu_s = _hook_times._totals["gc:gen2"]
        assert calls >= 2
        assert 0 < cpu_s < 5.0
        assert "process_cpu_s" in _hook_times.snapshot()
    finally:
        gc.callbacks.remove(_hook_times._gc_callback)
