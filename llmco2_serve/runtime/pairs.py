"""Append-only JSONL writer for (prediction, measurement) pairs, off the request path.

:class:`PairsWriter` is what the API server hands finished rows to. ``write(row)`` only puts the
dict on a bounded queue (never blocks, never touches the disk); one daemon thread serialises each
row and appends it as one complete line with a single ``os.write`` on an ``O_APPEND`` descriptor,
so a killed process leaves whole lines behind (only a power loss or a full disk can cut one).

Robustness, in the order an operator meets it:

* the queue is full (the disk is slower than the request rate): the row is dropped and counted in
  ``dropped``; serving never waits for the disk;
* the file ends in a partial line (a crash of an earlier writer, or of a different tool): the
  writer starts on a new line first (``repaired`` is set, one warning), so the next row is not glued
  onto the remnant; ``llmco2 train``/``eval`` skip such a cut-off row with a counted warning
  (``records.load_records``);
* an ``OSError`` (unwritable path, full disk): the writer switches itself off with one warning,
  keeps the reason in ``failed_reason`` and counts the rows it could not write in ``dropped``;
* ``path`` empty or ``None``: disabled, ``write`` returns ``False``.

Counters are read without a lock (plain ints, for logs and tests).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["PairsWriter"]

_STOP = object()


class PairsWriter:
    """Background JSONL appender (module docstring).

    Args:
        path: the JSONL file (``~`` expanded; parent folders created); empty or ``None`` disables.
        max_queue: rows waiting for the disk before ``write`` starts dropping.
    """

    def __init__(self, path: str | os.PathLike | None, *, max_queue: int = 10000) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue!r}")
        text = os.fspath(path).strip() if path is not None else ""
        self.path: str | None = os.path.expanduser(text) if text else None
        self.written = 0  # rows on disk
        self.dropped = 0  # rows handed to write() that will never be on disk (queue full, failure)
        self.failed_reason: str | None = None
        self.repaired = False  # the file ended in a partial line and the writer started a new one
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._drop_lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.path is not None:
            self._thread = threading.Thread(target=self._run, name="llmco2-pairs", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        """True while rows can still reach the file."""
        return self.path is not None and self.failed_reason is None and not self._closed

    # ------------------------------------------------------------------ caller side
    def write(self, row: Mapping[str, Any]) -> bool:
        """Queue ``row`` (owned by the writer from now on). Never blocks; ``False`` when the row
        will not be written (disabled, closed, failed, or the queue is full: counted in ``dropped``)."""
        if self.path is None or self._closed:
            return False
        if self.failed_reason is not None:
            self._count_dropped(1)
            return False
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._count_dropped(1)
            return False
        return True

    def close(self, timeout_s: float = 2.0) -> bool:
        """Write what is queued (up to ``timeout_s``) and close the file. ``True`` when everything
        queued reached the disk (or there was nothing to do). Idempotent."""
        if self._thread is None:
            self._closed = True
            return True
        if not self._closed:
            self._closed = True
            try:
                self._queue.put(_STOP, timeout=max(timeout_s, 0.0))
            except queue.Full:
                pass  # the thread is stuck on the disk; it exits at its next row check
        self._thread.join(timeout=max(timeout_s, 0.0))
        return not self._thread.is_alive() and self._queue.empty()

    def _count_dropped(self, n: int) -> None:
        with self._drop_lock:
            self.dropped += n

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            row = self._queue.get()
            if row is _STOP:
                break
            try:
                line = (json.dumps(row, sort_keys=True, default=str) + "\n").encode("utf-8")
            except (TypeError, ValueError) as e:  # e.g. a circular row: lose this row only
                self._count_dropped(1)
                logger.warning("llmco2 pairs: a row could not be serialised (%s); row dropped", e)
                continue
            try:
                if self._fd is None:
                    self._open()
                _write_all(self._fd, line)
                self.written += 1
            except OSError as e:
                self._fail(e)
                return
        self._close_fd()

    def _open(self) -> None:
        assert self.path is not None
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if _ends_in_partial_line(fd, self.path):
                # A crash left a cut-off row: start on a new line so the next row stays valid JSON.
                _write_all(fd, b"\n")
                self.repaired = True
                logger.warning("llmco2 pairs: %s ended in a partial line (an earlier writer was cut off); "
                               "starting on a new line (llmco2 train/eval skip the cut-off row)", self.path)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _fail(self, e: OSError) -> None:
        self.failed_reason = f"{self.path}: {e.strerror or e}"
        lost = 1  # the row in hand
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                lost += 1
        self._count_dropped(lost)
        self._close_fd()
        logger.warning("llmco2 pairs: cannot write %s (%s); pairs switched off (%d written, %d dropped)",
                       self.path, e.strerror or e, self.written, self.dropped)

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _ends_in_partial_line(fd: int, path: str) -> bool:
    """True when the regular file behind ``fd`` is non-empty and its last byte is not a newline."""
    import stat

    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return False  # a FIFO or device (nothing to repair), or an empty file
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` for a line in practice; loops on the rare short write."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
