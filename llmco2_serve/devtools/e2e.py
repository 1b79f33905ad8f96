"""A vLLM server with the plugin, a tiny local model and a local OTLP receiver, for end-to-end
tests (the same launcher a user has: ``llmco2 serve``). Starting it costs ~15-30 s on 2 CPUs.

Use as a context manager::

    with PluginServer(tmp, {"LLMCO2_ENERGY_READER": "fake"}) as srv:
        srv.base_url, srv.receiver, srv.log_path
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmco2_serve.devtools.demo import post_completion
from llmco2_serve.devtools.serverctl import ServerProcess, free_port
from llmco2_serve.devtools.otlp_receiver import OtlpReceiver
from llmco2_serve.devtools.tinymodel import build_tiny_model

__all__ = ["PluginServer", "closed_loop_completions", "steady_batch_context_ratio"]

# Every test server starts from the same clean slate: none of the caller's plugin or OTel settings.
_CLEARED_PREFIXES = ("LLMCO2_", "VLLM_PLUGINS", "OTEL_")


class PluginServer:
    """Build a tiny llama under ``tmp``, start a receiver and ``llmco2 serve`` with ``env``.

    Args:
        tmp: a folder of the test's.
        env: plugin and OTel variables for the server (on top of the defaults below).
        max_num_seqs: vLLM's ``--max-num-seqs``.
        metrics_to_receiver: export the plugin's metrics to the receiver too
            (``LLMCO2_OTLP_METRICS_ENDPOINT``).
        extra_args: more ``vllm serve`` arguments.
        ready_timeout_s: how long to wait for ``/health``.
        tracing: pass ``--otlp-traces-endpoint`` (vLLM builds spans); False is vLLM's default.
    """

    def __init__(self, tmp: Path, env: Mapping[str, str], *, max_num_seqs: int = 32,
                 metrics_to_receiver: bool = False, extra_args: Sequence[str] = (),
                 ready_timeout_s: float = 240.0, tracing: bool = True) -> None:
        self.tmp = Path(tmp)
        self.model = build_tiny_model(self.tmp / "llama", "llama")
        self.receiver = OtlpReceiver().start()
        port = free_port()
        full_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith(_CLEARED_PREFIXES)}
        full_env.update({
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # export spans quickly
            "LLMCO2_GPU": "H100",
            **env,
        })
        if metrics_to_receiver:
            full_env["LLMCO2_OTLP_METRICS_ENDPOINT"] = self.receiver.endpoint
        cmd = [sys.executable, "-m", "llmco2_serve.cli", "serve", str(self.model), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
               "--max-num-seqs", str(max_num_seqs), "--served-model-name", "tiny-llama",
               *(("--otlp-traces-endpoint", self.receiver.traces_endpoint) if tracing else ()), *extra_args]
        self.process = ServerProcess(cmd, port=port, env=full_env, log_path=self.tmp / "server.log",
                                     ready_timeout_s=ready_timeout_s)

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def start(self) -> PluginServer:
        try:
            self.process.start()
        except BaseException:
            self.receiver.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            self.process.stop()
        finally:
            self.receiver.stop()

    def __enter__(self) -> PluginServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def closed_loop_completions(base_url: str, n_requests: int, clients: int, *, max_tokens: int = 32,
                            model: str = "tiny-llama", timeout_s: float = 120.0) -> list[int]:
    """A steady load: ``clients`` closed-loop clients (a new connection per request, so several API
    servers share them) send ``n_requests`` completions of ``max_tokens`` tokens (``ignore_eos``);
    the HTTP status of each, in request order (0: no answer)."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n_requests):
        todo.put(i)
    statuses = [0] * n_requests

    def client() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            body = {"model": model, "prompt": "x" * (8 + i % 20), "max_tokens": max_tokens, "ignore_eos": True}
            statuses[i] = post_completion(base_url, body, index=i, timeout_s=timeout_s).status

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * n_requests)
    return statuses


def wait_for_pairs(pairs_path: Path, n: int, timeout_s: float = 30.0) -> list[dict]:
    """The rows of a pairs file once it has at least ``n`` (final values are written about one
    counter period after a request finishes), or what it has after ``timeout_s``."""
    path = Path(pairs_path)
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def steady_batch_context_ratio(pairs_path: Path, clients: int, first_row: int = 0) -> tuple[float, int]:
    """Median of predicted batch context / the engine's mean batch over the pairs rows of a
    :func:`closed_loop_completions` run that starts at row ``first_row``, and how many rows that is.

    ``mean_batch`` (the mean rows of the engine steps a request ran in) is the engine core's record
    of vLLM's ``SchedulerOutput``; rows are written as requests finish, so the first two waves
    (ramp-up) and the last one (drain) are left out."""
    lines = [line for line in Path(pairs_path).read_text().splitlines() if line.strip()][first_row:]
    rows = [json.loads(line) for line in lines]
    steady = [r for r in rows[2 * clients:-clients] if r.get("mean_batch")]
    if not steady:
        raise ValueError(f"no steady-state rows in {pairs_path} after row {first_row}")
    return statistics.median(r["batch_context_predicted"] / r["mean_batch"] for r in steady), len(steady)
