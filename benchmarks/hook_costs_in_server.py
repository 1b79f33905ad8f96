"""The plugin's CPU cost in a real vLLM server, hook by hook, in thread CPU time per request.

Starts one server with the plugin on and ``LLMCO2_DEV_HOOK_TIMES`` set (``hooks/_hook_times.py``:
every patch and the vLLM original inside it are timed with ``time.thread_time``, and the engine
core's poller too), warms it up, then runs ``--requests`` completions of ``--max-tokens`` tokens
at ``--concurrency`` (the load of ``serving_overhead.py``). Prints, per server process (API
server, engine core), each hook's calls per request, the plugin's own microseconds per request
(the wrapper minus the vLLM original it calls) and vLLM's, over the measured requests only.

Unlike py-spy (``profile_server.py``), which samples every runnable thread, this counts CPU time
a thread really ran, so a busy 2-core machine does not inflate it; unlike ``hook_overhead.py`` the
step pattern is the one vLLM produces under this load. The timing itself costs ~1 us per call.
Run: ``python benchmarks/hook_costs_in_server.py [--measure | --off] [--max-tokens 1] [--requests
3000] [--env KEY=VALUE ...]``; ``--measure`` sets ``LLMCO2_ENERGY_READER=fake-work`` (the engine
meter, first answers and final values run, as with NVML on a GPU); ``--off`` runs the plugin off
(``LLMCO2_ENABLED=0``), printing only each process's CPU and garbage-collection time per request.
Garbage collections (``gc:genN``) are timed in every process, all of vLLM's and the plugin's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_overhead import add_served_load_arguments, run_round, throughput_bodies  # noqa: E402

from llmco2_serve.devtools import serverctl  # noqa: E402
from llmco2_serve.devtools.demo import usable_token_ids  # noqa: E402


def read_times(prefix: Path, settle_s: float = 0.7) -> dict[int, dict]:
    """pid -> that process's latest totals (written twice a second)."""
    time.sleep(settle_s)
    out: dict[int, dict] = {}
    for path in prefix.parent.glob(f"{prefix.name}.*.json"):
        try:
            snap = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[int(snap["pid"])] = snap
    return out


def per_request(before: dict[int, dict], after: dict[int, dict], n: int) -> dict[str, dict[str, dict]]:
    """process name -> hook -> {calls, plugin_us, vllm_us} per request, between two snapshots;
    garbage collections (``gc:genN``, all vLLM's and the plugin's together) count as ``vllm_us``,
    and ``process`` is the process's whole CPU time."""
    result: dict[str, dict[str, dict]] = {}
    for pid, snap in after.items():
        prev = before.get(pid, {"hooks": {}})
        old = prev["hooks"]
        delta = {k: (v[0] - old.get(k, [0, 0.0])[0], v[1] - old.get(k, [0, 0.0])[1]) for k, v in snap["hooks"].items()}
        rows = {}
        for name, (calls, cpu_s) in delta.items():
            if name.endswith(":vllm") or calls <= 0:
                continue
            vllm_s = cpu_s if name.startswith("gc:") else delta.get(f"{name}:vllm", (0, 0.0))[1]
            rows[name] = {"calls": calls / n, "plugin_us": (cpu_s - vllm_s) / n * 1e6, "vllm_us": vllm_s / n * 1e6}
        if "process_cpu_s" in snap and "process_cpu_s" in prev:
            rows["process"] = {"calls": 0.0, "plugin_us": 0.0,
                               "vllm_us": (snap["process_cpu_s"] - prev["process_cpu_s"]) / n * 1e6}
        if rows:
            result[f"{snap['comm'] or 'process'} (pid {pid})"] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_served_load_arguments(p)
    p.add_argument("--measure", action="store_true", help="LLMCO2_ENERGY_READER=fake-work (the measurement on)")
    p.add_argument("--off", action="store_true",
                   help="LLMCO2_ENABLED=0: no hooks; each process's CPU and GC time, to compare with on")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("llmco2-hook-costs"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cpu = serverctl.is_cpu_build()
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "hook-times"
    for old in args.out.glob(f"{prefix.name}.*"):
        old.unlink()
    from llmco2_serve.devtools.tinymodel import build_tiny_model

    model_dir = str(build_tiny_model(args.out / "model-llama", "llama"))
    vocabulary = usable_token_ids(model_dir)
    # --off: the plugin loaded but disabled (LLMCO2_ENABLED=0: it patches nothing, imports no
    # predictor), so the DEV-ONLY timer still runs in every process; serving_overhead.py's "off"
    # does not load it at all.
    env = {**serverctl.default_server_env(cpu=cpu), **serverctl.plugin_env(True), "LLMCO2_PAIRS_PATH": "",
           **({"LLMCO2_ENABLED": "0"} if args.off else {}),
           "LLMCO2_DEV_HOOK_TIMES": str(prefix.resolve()),
           **({"LLMCO2_ENERGY_READER": "fake-work"} if args.measure else {}),
           **dict(kv.split("=", 1) for kv in args.env)}
    with serverctl.VllmServer(model_dir, env=env, log_path=args.out / "vllm.log",
                              extra_args=serverctl.default_engine_args(max_model_len=args.max_model_len, cpu=cpu)) as srv:
        name = srv.served_model()
        run_round(srv.base_url, throughput_bodies(name, vocabulary, args.warmup, args.prompt_tokens, args.max_tokens,
                                                  seed=1000), args.concurrency)
        before = read_times(prefix)
        stats = run_round(srv.base_url, throughput_bodies(name, vocabulary, args.requests, args.prompt_tokens,
                                                          args.max_tokens, seed=0), args.concurrency)
        after = read_times(prefix)
    n = stats.n_ok
    table = per_request(before, after, max(n, 1))
    state = "off" if args.off else "on" + (" with the measurement (fake-work)" if args.measure else "")
    print(f"plugin {state}: {stats.requests_per_s:.1f} req/s, "
          f"{n} of {args.requests} x {args.max_tokens} token(s) ok, concurrency {args.concurrency}")
    for proc, rows in table.items():
        total = sum(r["plugin_us"] for r in rows.values())
        process = rows.pop("process", None)
        gc_us = sum(r["vllm_us"] for k, r in rows.items() if k.startswith("gc:"))
        print(f"{proc}: the plugin's hooks {total:.1f} us per request; garbage collection {gc_us:.1f} us"
              + (f"; the process's CPU {process['vllm_us']:.1f} us" if process else ""))
        for hook, r in sorted(rows.items(), key=lambda kv: (-kv[1]["plugin_us"], -kv[1]["vllm_us"])):
            print(f"  {r['plugin_us']:7.1f} us plugin  {r['vllm_us']:8.1f} us vLLM  {r['calls']:6.2f} calls  {hook}")
    if args.json:
        args.json.write_text(json.dumps({"requests_per_s": stats.requests_per_s, "requests": n, "per_request": table},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
