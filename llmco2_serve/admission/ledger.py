"""Tenant carbon budgets over rolling windows: an exact in-memory ledger, persisted in SQLite (WAL).

Why in memory first: an admission decision must cost well under a millisecond (target 0.2 ms p99
including the store) and be exact under concurrency. Every check-and-reserve happens under one
lock on integer nanograms (no float drift: the window sums are exact, whatever the order of
reservations and settlements). The SQLite file is the durable copy: a background writer commits
the changes in batches every ``flush_interval_s`` (default 50 ms) and on :meth:`close`; at
start-up the entries still inside the longest window are read back, so a restart keeps every
tenant's spend. What a crash (not a clean stop) can lose: the changes of the last flush interval.

Entry life: ``reserve`` (the predicted upper bound, at admission) -> ``end`` (the request finished
or was aborted; the entry waits ``settle_wait_s`` for its measured final value) -> ``settle`` (the
measured value, or else the fallback the caller gave: the prediction). An entry that never hears
back is settled at its expected value after ``reservation_ttl_s``. Reservations left open by a
previous process (it stopped with requests in flight) are settled at their expected value when
the file is read back.

Several processes (vLLM's ``--api-server-count N > 1``, or several servers on one node sharing a
store): :class:`SharedBudgetLedger`. Every operation is one SQLite transaction (``BEGIN IMMEDIATE``
under an exclusive ``flock`` of ``STORE.lock``, so waiting processes wake as soon as the holder
commits instead of polling SQLite's busy handler in 1 ms steps): the process first applies every
change the others committed since its last transaction (rows carry a store-wide sequence number),
then decides on its in-memory view, now exact, and commits its own changes with the next sequence
numbers. Budgets are then exact across the processes, at the price of one small transaction per
reservation, settlement and end (measured by ``benchmarks/admission_overhead.py --shared``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import Window

logger = logging.getLogger(__name__)

__all__ = ["BudgetLedger", "Entry", "Refusal", "SharedBudgetLedger", "StoreError", "NG_PER_G", "default_shared_path"]

NG_PER_G = 1_000_000_000  # amounts are kept in integer nanograms (exact sums)
RESERVED, ENDED, SETTLED = "reserved", "ended", "settled"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    t REAL NOT NULL,
    amount_ng INTEGER NOT NULL,
    expected_ng INTEGER NOT NULL,
    reserved_ng INTEGER NOT NULL,
    state TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ledger_t ON ledger (t);
"""


class StoreError(RuntimeError):
    """The SQLite store could not be opened or written."""


def to_ng(g: float) -> int:
    if not math.isfinite(g) or g < 0:
        return 0
    return int(round(g * NG_PER_G))


@dataclass(eq=False, slots=True)  # one per request inside the longest window: keep them small
class Entry:
    id: str
    tenant: str
    t: float  # admission time (s since the epoch): the entry counts in a window while t > now - window
    amount_ng: int  # what it counts now: the reservation, then the settled value
    expected_ng: int
    reserved_ng: int
    state: str = RESERVED
    deadline: float = math.inf  # when an ended entry settles at its fallback
    fallback_ng: int = 0
    source: str = ""  # settled by: "measured", "predicted", "expired", "orphaned"

    @property
    def amount_g(self) -> float:
        return self.amount_ng / NG_PER_G


@dataclass(frozen=True)
class Refusal:
    """Why a reservation did not fit: the window, its limit and current spend (g), and when it
    would fit if nothing else were admitted (``retry_after_s``; None: never, it is above the limit alone)."""

    window: Window
    spent_g: float
    requested_g: float
    retry_after_s: float | None


class _WindowSum:
    __slots__ = ("seconds", "limit_ng", "entries", "sum_ng")

    def __init__(self, w: Window) -> None:
        self.seconds = w.seconds
        self.limit_ng = to_ng(w.co2_g)
        self.entries: collections.deque[Entry] = collections.deque()
        self.sum_ng = 0

    def expire(self, now: float) -> None:
        cutoff = now - self.seconds
        q = self.entries
        while q and q[0].t <= cutoff:
            self.sum_ng -= q.popleft().amount_ng


class _Tenant:
    __slots__ = ("entries", "windows")

    def __init__(self) -> None:
        self.entries: collections.deque[Entry] = collections.deque()  # everything inside the retention
        self.windows: list[_WindowSum] = []


class BudgetLedger:
    """Thread-safe ledger. ``windows_for(tenant)`` gives a tenant's windows (the config; it may
    change at any time: call :meth:`reconfigure`). ``path`` None: memory only."""

    def __init__(self, path: str | None, windows_for: Callable[[str], tuple[Window, ...]], *,
                 retention_s: float, flush_interval_s: float = 0.05, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._windows_for = windows_for
        self.retention_s = max(float(retention_s), 1.0)
        self._clock = clock
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}
        self._by_id: dict[str, Entry] = {}  # every entry inside the retention, by request id
        # Reservations not ended yet, oldest first (for expiry without scanning every entry).
        self._reserved: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._ended: collections.deque[Entry] = collections.deque()  # in deadline order (constant wait)
        self._now = 0.0
        self.write_failures = 0
        self.last_write_error: str | None = None
        self.settled_measured = 0
        self.settled_fallback = 0
        self._db: sqlite3.Connection | None = None
        self._q: queue.SimpleQueue[tuple[str, Entry | None]] = queue.SimpleQueue()
        self._flush_interval_s = flush_interval_s
        self._flush_lock = threading.Lock()
        self._closed = threading.Event()
        self._writer: threading.Thread | None = None
        if path:
            self._open(path)  # raises StoreError
            self._writer = threading.Thread(target=self._write_loop, name="llmco2-ledger", daemon=True)
            self._writer.start()

    # ------------------------------------------------------------------ persistence
    def _open(self, path: str) -> None:
        try:
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, atomic always
            db.executescript(_SCHEMA)
            now = self._clock()
            rows = db.execute("SELECT id, tenant, t, amount_ng, expected_ng, reserved_ng, state, source "
                              "FROM ledger WHERE t > ? ORDER BY t", (now - self.retention_s,)).fetchall()
            # A write now, so a read-only file or folder fails here, at start-up, not later.
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM ledger WHERE t <= ?", (now - self.retention_s,))
            orphans = [r[0] for r in rows if r[6] != SETTLED]
            db.executemany("UPDATE ledger SET amount_ng = expected_ng, state = 'settled', source = 'orphaned' "
                           "WHERE id = ?", [(i,) for i in orphans])
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot use the budget store {path}: {type(e).__name__}: {e}") from e
        self._db = db
        for rid, tenant, t, amount, expected, reserved, state, source in rows:
            if state != SETTLED:  # its request died with the previous process: charge the prediction
                amount, state, source = expected, SETTLED, "orphaned"
            e = Entry(rid, tenant, float(t), int(amount), int(expected), int(reserved), state, source=source)
            self._by_id[rid] = e
            self._tenant(tenant).entries.append(e)
        self._now = now
        self.reconfigure()
        if rows:
            logger.info("llmco2: budget ledger %s: %d entries in the last %.0f s read back (%d orphaned "
                        "reservations settled at their expected value)", path, len(rows), self.retention_s,
                        len(orphans))

    def _write_loop(self) -> None:
        while not self._closed.is_set():
            self._closed.wait(self._flush_interval_s)
            self.flush()

    def flush(self) -> int:
        """Write the pending changes (one transaction). Returns how many were written."""
        db = self._db
        if db is None:
            return 0
        with self._flush_lock:  # the writer thread and close()/callers share one connection
            return self._flush_locked(db)

    def _flush_locked(self, db: sqlite3.Connection) -> int:
        batch: dict[str, Entry] = {}
        deletes: list[str] = []
        while True:
            try:
                op, e = self._q.get_nowait()
            except queue.Empty:
                break
            if op == "put" and e is not None:
                batch[e.id] = e
            elif op == "prune":
                deletes.append("")
        if not batch and not deletes:
            return 0
        entries = list(batch.values())
        rows = []
        for i in range(0, len(entries), 256):  # short holds of the decisions' lock, however big the backlog
            with self._lock:  # a consistent snapshot of each entry
                rows.extend((e.id, e.tenant, e.t, e.amount_ng, e.expected_ng, e.reserved_ng,
                             SETTLED if e.state == SETTLED else RESERVED, e.source) for e in entries[i:i + 256])
        cutoff = self._now - self.retention_s
        try:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO ledger (id, tenant, t, amount_ng, expected_ng, reserved_ng, "
                           "state, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if deletes:
                db.execute("DELETE FROM ledger WHERE t <= ?", (cutoff,))
            db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.write_failures += 1
            if self.last_write_error is None:
                logger.warning("llmco2: budget store %s: write failed (%s); the ledger keeps working in memory "
                               "and retries (further failures counted)", self.path, e)
            self.last_write_error = f"{type(e).__name__}: {e}"
            for ent in batch.values():  # retried at the next flush
                self._q.put(("put", ent))
            return 0
        return len(rows)

    def close(self) -> None:
        self._closed.set()
        if self._writer is not None:
            self._writer.join(timeout=5.0)
        self.flush()
        self._close_db()

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    # ------------------------------------------------------------------ windows
    def _tenant(self, name: str) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant()
            t.windows = [_WindowSum(w) for w in self._windows_for(name)]
        return t

    def reconfigure(self, windows_for: Callable[[str], tuple[Window, ...]] | None = None) -> None:
        """New window definitions (config reload): every tenant's sums are rebuilt from its entries."""
        with self._lock:
            if windows_for is not None:
                self._windows_for = windows_for
            self._rebuild_windows_locked()

    def _rebuild_windows_locked(self) -> None:
        for name, t in self._tenants.items():
            t.windows = []
            for w in self._windows_for(name):
                ws = _WindowSum(w)
                cutoff = self._now - w.seconds
                for e in t.entries:
                    if e.t > cutoff:
                        ws.entries.append(e)
                        ws.sum_ng += e.amount_ng
                t.windows.append(ws)

    def _advance(self, now: float) -> float:
        # Never backwards (a wall clock step must not put expired entries back in a window).
        if now < self._now:
            now = self._now
        self._now = now
        return now

    # ------------------------------------------------------------------ the operations
    def try_reserve(self, tenant: str, request_id: str, reserve_g: float, expected_g: float,
                    now: float | None = None, *, force: bool = False) -> Refusal | None:
        """Check every window of ``tenant`` and reserve ``reserve_g`` when it fits in all of them
        (atomically). Returns None when reserved, else the first window it does not fit in.
        ``force``: reserve even when it does not fit (dry-run: the request runs and spends)."""
        amount = to_ng(reserve_g)
        expected = min(to_ng(expected_g), amount)
        with self._lock:
            now = self._advance(self._clock() if now is None else now)
            self._sweep_locked(now)
            t = self._tenant(tenant)
            refusal = None
            for ws in t.windows:
                ws.expire(now)
                if ws.sum_ng + amount > ws.limit_ng and refusal is None:
                    refusal = Refusal(Window(ws.seconds, ws.limit_ng / NG_PER_G), ws.sum_ng / NG_PER_G,
                                      reserve_g, self._fits_after(ws, amount, now))
            if refusal is not None and not force:
                return refusal
            e = Entry(request_id, tenant, now, amount, expected, amount)
            old = self._by_id.pop(request_id, None)
            if old is not None:  # the same id again (should not happen): the old one ends now
                self._settle_locked(old, old.expected_ng, "expired", now)
            self._by_id[request_id] = e
            t.entries.append(e)
            self._reserved[request_id] = e
            self._trim_locked(t, now)
            for ws in t.windows:
                ws.entries.append(e)
                ws.sum_ng += amount
        self._q.put(("put", e))
        return refusal

    @staticmethod
    def _fits_after(ws: _WindowSum, amount: int, now: float) -> float | None:
        if amount > ws.limit_ng:
            return None
        need = ws.sum_ng + amount - ws.limit_ng
        freed = 0
        for e in ws.entries:
            freed += e.amount_ng
            if freed >= need:
                return max(0.0, e.t + ws.seconds - now)
        return ws.seconds

    def end(self, request_id: str, fallback_g: float | None, wait_s: float, now: float | None = None) -> bool:
        """The request ended (finished or aborted): settle at its measured value if one comes
        within ``wait_s`` (:meth:`settle`), else at ``fallback_g`` (None: its expected value)."""
        with self._lock:
            e = self._by_id.get(request_id)
            if e is None or e.state != RESERVED:
                return False
            now = self._advance(self._clock() if now is None else now)
            e.fallback_ng = e.expected_ng if fallback_g is None else to_ng(fallback_g)
            self._reserved.pop(request_id, None)
            if wait_s <= 0:
                self._settle_locked(e, e.fallback_ng, "predicted", now)
            else:
                e.state, e.deadline = ENDED, now + wait_s
                self._ended.append(e)
            self._sweep_locked(now)
        return True

    def settle(self, request_id: str, amount_g: float, source: str = "measured", now: float | None = None) -> bool:
        """Settle at a measured value (the request may not have ended yet: the final value and the
        finish can come in either order)."""
        with self._lock:
            e = self._by_id.get(request_id)
            if e is None or e.state == SETTLED:
                return False
            now = self._advance(self._clock() if now is None else now)
            self._settle_locked(e, to_ng(amount_g), source, now)
        return True

    def sweep(self, now: float | None = None) -> None:
        with self._lock:
            self._sweep_locked(self._advance(self._clock() if now is None else now))

    def _sweep_locked(self, now: float) -> None:
        q = self._ended
        while q and (q[0].state == SETTLED or q[0].deadline <= now):
            e = q.popleft()
            if e.state != SETTLED:
                self._settle_locked(e, e.fallback_ng, "predicted", now)

    def expire_stale(self, ttl_s: float, now: float | None = None) -> int:
        """Settle reservations that never heard back within ``ttl_s`` at their expected value."""
        n = 0
        with self._lock:
            now = self._advance(self._clock() if now is None else now)
            q = self._reserved
            while q:
                e = next(iter(q.values()))
                if e.t > now - ttl_s:
                    break
                self._settle_locked(e, e.expected_ng, "expired", now)  # removes it from _reserved
                n += 1
            for t in self._tenants.values():  # tenants that stopped sending: their old entries go too
                self._trim_locked(t, now)
        if n or self._db is not None:
            self._q.put(("prune", None))
        return n

    def _trim_locked(self, t: _Tenant, now: float) -> None:
        """Drop a tenant's entries older than the retention (amortised O(1) per entry)."""
        cutoff = now - self.retention_s
        q = t.entries
        while q and q[0].t <= cutoff:
            old = q.popleft()
            if self._by_id.get(old.id) is old:
                del self._by_id[old.id]
            if self._reserved.get(old.id) is old:
                del self._reserved[old.id]
        for ws in t.windows:
            ws.expire(now)

    def _settle_locked(self, e: Entry, amount_ng: int, source: str, now: float) -> None:
        if self._reserved.get(e.id) is e:
            del self._reserved[e.id]
        delta = amount_ng - e.amount_ng
        e.amount_ng, e.state, e.source = amount_ng, SETTLED, source
        if source == "measured":
            self.settled_measured += 1
        else:
            self.settled_fallback += 1
        if delta:
            t = self._tenants.get(e.tenant)
            if t is not None:
                for ws in t.windows:
                    ws.expire(now)
                    if e.t > now - ws.seconds:  # still counted in this window
                        ws.sum_ng += delta
        if self._db is not None:
            self._q.put(("put", e))

    # ------------------------------------------------------------------ reading
    def spent_g(self, tenant: str, window_s: float, now: float | None = None) -> float:
        """What ``tenant`` has spent (settled + reserved) in the last ``window_s`` seconds."""
        with self._lock:
            now = self._advance(self._clock() if now is None else now)
            t = self._tenants.get(tenant)
            if t is None:
                return 0.0
            cutoff = now - window_s
            return sum(e.amount_ng for e in t.entries if e.t > cutoff) / NG_PER_G

    def entry(self, request_id: str) -> Entry | None:
        return self._by_id.get(request_id)

    def entries(self, tenant: str | None = None) -> list[Entry]:
        with self._lock:
            ts: Iterable[_Tenant] = (self._tenants.values() if tenant is None
                                     else [self._tenants[tenant]] if tenant in self._tenants else [])
            return [e for t in ts for e in t.entries]

    def open_reservations(self) -> int:
        with self._lock:
            return len(self._reserved) + sum(1 for e in self._ended if e.state == ENDED)


# ====================================================================== several processes
def default_shared_path() -> str:
    """Where API servers that share a memory-only budget (no ``store`` configured) keep it: one
    file per ``vllm serve`` run, named after the parent process that started the API servers, in
    vLLM's ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder per run unless the user set it)
    or else the temporary folder. Nothing there is read back by the next run (another parent)."""
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.gettempdir()
    return os.path.join(d, f"llmco2-admission-{os.getppid()}.sqlite")


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():  # 0: written by a single-process ledger; ours: a previous run's
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class _Pending:
    """Shared mode: the changes of the current transaction (the base class's write queue)."""

    __slots__ = ("puts", "prune")

    def __init__(self) -> None:
        self.puts: dict[str, Entry] = {}
        self.prune = False

    def put(self, item: tuple[str, Entry | None]) -> None:
        op, e = item
        if op == "put" and e is not None:
            self.puts[e.id] = e
        elif op == "prune":
            self.prune = True


_ROW = "id, tenant, t, amount_ng, expected_ng, reserved_ng, state, source"


class SharedBudgetLedger(BudgetLedger):
    """The ledger shared by several processes on one node through one SQLite (WAL) file.

    Same interface and in-memory algorithms as :class:`BudgetLedger`; what changes is that each
    operation is a transaction that first catches up with the other processes' committed changes
    (``seq`` > the last one seen), so the check-and-reserve is decided on the store's current
    state: exact across processes (never over a window's budget at admission, whatever the
    interleaving). Entry times are kept non-decreasing in commit order (a reservation's time is
    at least the newest time in the store), which keeps every process's windows in time order.

    Open reservations of a process that died are charged their expected value ("orphaned") when
    a process opens the store and finds their owner (pid) gone; the others expire after
    ``reservation_ttl_s`` like any lost reservation. A transaction that fails (disk full, locked
    beyond ``busy_timeout_s``) raises :class:`StoreError` (the controller fails open) and the
    next operation reloads the view from the store.
    """

    PRUNE_INTERVAL_S = 5.0

    def __init__(self, path: str, windows_for: Callable[[str], tuple[Window, ...]], *, retention_s: float,
                 clock: Callable[[], float] = time.time, busy_timeout_s: float = 5.0) -> None:
        super().__init__(None, windows_for, retention_s=retention_s, clock=clock)
        self.path = path
        self._pid = os.getpid()
        self._q = _Pending()  # type: ignore[assignment]  # the base class's writes land here
        self._txn_lock = threading.Lock()  # one transaction at a time in this process (then the flock)
        self._last_seq = 0
        self._need_reload = False
        self._last_prune = 0.0
        self._lock_fd = -1
        self.transactions = 0
        self.synced_rows = 0  # rows applied from the other processes
        self._busy_timeout_s = busy_timeout_s
        self._open_shared(path)

    # ------------------------------------------------------------------ store
    def _open_shared(self, path: str) -> None:
        import fcntl

        db = None
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=self._busy_timeout_s)
            db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                # SQLite's automatic checkpoint (every 1000 WAL pages) stays on: a background
                # PASSIVE checkpoint never catches up with continuous commits and the WAL grew
                # without bound (448 MB after 20k reservations). Its cost lands on ~1 commit in 200.
                db.execute("PRAGMA cache_size=-16384")  # 16 MB: the indexes' hot pages stay cached
                db.executescript(_SCHEMA)
                db.execute("BEGIN IMMEDIATE")
                cols = {r[1] for r in db.execute("PRAGMA table_info(ledger)")}
                if "seq" not in cols:  # a store written by a single-process ledger: add the columns
                    db.execute("ALTER TABLE ledger ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
                if "owner" not in cols:
                    db.execute("ALTER TABLE ledger ADD COLUMN owner INTEGER NOT NULL DEFAULT 0")
                db.execute("CREATE INDEX IF NOT EXISTS ledger_seq ON ledger (seq)")
                db.execute("CREATE TABLE IF NOT EXISTS ledger_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
                db.execute("INSERT OR IGNORE INTO ledger_meta (k, v) VALUES ('seq', 0)")
                now = self._clock()
                db.execute("DELETE FROM ledger WHERE t <= ?", (now - self.retention_s,))
                owners = [r[0] for r in db.execute("SELECT DISTINCT owner FROM ledger WHERE state != 'settled'")]
                dead = [o for o in owners if not _pid_alive(int(o))]
                n_orphans = 0
                for o in dead:
                    ids = [r[0] for r in db.execute("SELECT id FROM ledger WHERE owner = ? AND state != 'settled'",
                                                    (o,))]
                    for rid in ids:
                        seq = self._next_seq(db, 1)
                        db.execute("UPDATE ledger SET amount_ng = expected_ng, state = 'settled', source = 'orphaned', "
                                   "seq = ? WHERE id = ?", (seq, rid))
                    n_orphans += len(ids)
                db.execute("COMMIT")
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except (sqlite3.Error, OSError) as e:
            if db is not None:
                db.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            raise StoreError(f"cannot use the shared budget store {path}: {type(e).__name__}: {e}") from e
        self._db = db
        with self._lock:
            self._reload_locked(db)
        logger.info("llmco2: shared budget ledger %s (pid %d): %d entries in the last %.0f s, %d orphaned "
                    "reservations of stopped processes settled at their expected value", path, self._pid,
                    len(self._by_id), self.retention_s, n_orphans)

    @staticmethod
    def _next_seq(db: sqlite3.Connection, n: int) -> int:
        """Take ``n`` sequence numbers (inside the write transaction); returns the last one."""
        return int(db.execute("UPDATE ledger_meta SET v = v + ? WHERE k = 'seq' RETURNING v", (n,)).fetchone()[0])

    def _reload_locked(self, db: sqlite3.Connection) -> None:
        """The whole view from the store (at open, and after a failed transaction). Entries this
        process ended and is waiting to settle keep their deadline and fallback."""
        waiting = {e.id: (e.deadline, e.fallback_ng) for e in self._ended if e.state == ENDED}
        self._tenants.clear()
        self._by_id.clear()
        self._reserved.clear()
        self._ended.clear()
        self._last_seq = int(db.execute("SELECT v FROM ledger_meta WHERE k = 'seq'").fetchone()[0])
        now = max(self._now, self._clock())
        rows = db.execute(f"SELECT {_ROW} FROM ledger WHERE t > ? ORDER BY t", (now - self.retention_s,)).fetchall()
        for rid, tenant, t, amount, expected, reserved, state, source in rows:
            e = Entry(rid, tenant, float(t), int(amount), int(expected), int(reserved),
                      SETTLED if state == SETTLED else RESERVED, source=source)
            self._by_id[rid] = e
            self._tenant(tenant).entries.append(e)
            if e.state == RESERVED:
                w = waiting.get(rid)
                if w is not None:
                    e.state, e.deadline, e.fallback_ng = ENDED, w[0], w[1]
                    self._ended.append(e)
                else:
                    self._reserved[rid] = e
            now = max(now, e.t)
        self._now = now
        self._rebuild_windows_locked()
        self._need_reload = False

    def _sync_locked(self, db: sqlite3.Connection) -> None:
        """Apply what the other processes committed since our last transaction."""
        if self._need_reload:
            self._reload_locked(db)
            return
        v = int(db.execute("SELECT v FROM ledger_meta WHERE k = 'seq'").fetchone()[0])
        if v == self._last_seq:
            return
        rows = db.execute(f"SELECT {_ROW} FROM ledger WHERE seq > ? ORDER BY t, seq", (self._last_seq,)).fetchall()
        self._last_seq = v
        self.synced_rows += len(rows)
        now = self._now
        for rid, tenant, t, amount, expected, reserved, state, source in rows:
            amount = int(amount)
            e = self._by_id.get(rid)
            if e is None:
                # New to us. Its time is >= every entry we hold (times never decrease in commit
                # order, and we hold everything committed before our last transaction): appending
                # in (t, seq) order keeps the deques in time order.
                if t <= now - self.retention_s:
                    continue
                e = Entry(rid, tenant, float(t), amount, int(expected), int(reserved),
                          SETTLED if state == SETTLED else RESERVED, source=source)
                if e.t > now:
                    now = e.t
                self._by_id[rid] = e
                tn = self._tenant(tenant)
                tn.entries.append(e)
                for ws in tn.windows:
                    ws.entries.append(e)
                    ws.sum_ng += amount
                if e.state == RESERVED:
                    self._reserved[rid] = e
                continue
            delta = amount - e.amount_ng
            if delta:
                tn = self._tenants.get(e.tenant)
                if tn is not None:
                    for ws in tn.windows:  # as _settle_locked: only where it still counts
                        ws.expire(now)
                        if e.t > now - ws.seconds:
                            ws.sum_ng += delta
                e.amount_ng = amount
            if state == SETTLED and e.state != SETTLED:
                if self._reserved.get(rid) is e:
                    del self._reserved[rid]
                e.state, e.source = SETTLED, source
        self._now = now

    def _write_pending_locked(self, db: sqlite3.Connection) -> None:
        p: _Pending = self._q  # type: ignore[assignment]
        puts, p.puts = list(p.puts.values()), {}
        if puts:
            with self._lock:  # a consistent snapshot of each entry
                last = self._next_seq(db, len(puts))
                first = last - len(puts) + 1
                rows = [(e.id, e.tenant, e.t, e.amount_ng, e.expected_ng, e.reserved_ng,
                         SETTLED if e.state == SETTLED else RESERVED, e.source, first + i, self._pid)
                        for i, e in enumerate(puts)]
            db.executemany("INSERT INTO ledger (id, tenant, t, amount_ng, expected_ng, reserved_ng, state, source, "
                           "seq, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                           "tenant = excluded.tenant, t = excluded.t, amount_ng = excluded.amount_ng, "
                           "expected_ng = excluded.expected_ng, reserved_ng = excluded.reserved_ng, "
                           "state = excluded.state, source = excluded.source, seq = excluded.seq", rows)
            self._last_seq = last  # we saw everything before (synced under the same write lock)
        if p.prune:
            p.prune = False
            if self._now - self._last_prune >= self.PRUNE_INTERVAL_S:
                self._last_prune = self._now
                db.execute("DELETE FROM ledger WHERE t <= ?", (self._now - self.retention_s,))

    @contextlib.contextmanager
    def _txn(self, write: bool = True):
        import fcntl

        with self._txn_lock:
            db = self._db
            if db is None:
                raise StoreError(f"the shared budget store {self.path} is closed")
            if write:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                ok = False
                try:
                    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    with self._lock:
                        self._sync_locked(db)
                    yield
                    self._write_pending_locked(db)
                    db.execute("COMMIT")
                    ok = True
                    self.transactions += 1
                except sqlite3.Error as e:
                    self.write_failures += 1
                    if self.last_write_error is None:
                        logger.warning("llmco2: shared budget store %s: transaction failed (%s); the request is "
                                       "handled fail-open and the view is reloaded (further failures counted)",
                                       self.path, e)
                    self.last_write_error = f"{type(e).__name__}: {e}"
                    raise StoreError(f"shared budget store {self.path}: {type(e).__name__}: {e}") from e
                finally:
                    if not ok:
                        self._q = _Pending()  # type: ignore[assignment]
                        self._need_reload = True  # our in-memory changes may not be in the store
                        try:
                            db.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
            finally:
                if write:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ the operations, as transactions
    def try_reserve(self, tenant: str, request_id: str, reserve_g: float, expected_g: float,
                    now: float | None = None, *, force: bool = False) -> Refusal | None:
        with self._txn():
            return super().try_reserve(tenant, request_id, reserve_g, expected_g, now, force=force)

    def end(self, request_id: str, fallback_g: float | None, wait_s: float, now: float | None = None) -> bool:
        with self._txn():
            return super().end(request_id, fallback_g, wait_s, now)

    def settle(self, request_id: str, amount_g: float, source: str = "measured", now: float | None = None) -> bool:
        with self._txn():
            return super().settle(request_id, amount_g, source, now)

    def sweep(self, now: float | None = None) -> None:
        with self._txn():
            super().sweep(now)

    def expire_stale(self, ttl_s: float, now: float | None = None) -> int:
        with self._txn():
            return super().expire_stale(ttl_s, now)

    def reconfigure(self, windows_for: Callable[[str], tuple[Window, ...]] | None = None) -> None:
        if self._db is None:  # during the base constructor
            super().reconfigure(windows_for)
            return
        with self._txn(write=False):
            super().reconfigure(windows_for)

    def spent_g(self, tenant: str, window_s: float, now: float | None = None) -> float:
        with self._txn(write=False):
            return super().spent_g(tenant, window_s, now)

    def entries(self, tenant: str | None = None) -> list[Entry]:
        with self._txn(write=False):
            return super().entries(tenant)

    def open_reservations(self) -> int:
        with self._txn(write=False):
            return super().open_reservations()

    def flush(self) -> int:
        return 0  # every change is committed by its own transaction

    def close(self) -> None:
        self._closed.set()
        with self._txn_lock:
            self._close_db()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
