"""Where a vLLM server's CPU goes under load, and how much of it is the llmco2 plugin's own code.

Starts one server (plugin on unless ``--plugin off``), warms it up, then samples every process of
it with py-spy (``pip install py-spy``) while ``--requests`` completions of ``--max-tokens`` tokens
run at ``--concurrency`` (the load of ``serving_overhead.py``). Prints:

* the share of samples whose innermost frames are the plugin's code (``llmco2_serve/``,
  ``hooks/``, and NumPy/stdlib called from them): what the plugin costs the server;
* the plugin functions with the most samples (inclusive), and the server's busiest functions.

Idle samples are not counted (py-spy's default), so shares are of the server's busy CPU time.
Run: ``python benchmarks/profile_server.py [--max-tokens 1] [--requests 3000] [--plugin on|off]
[--raw OUT.txt]``. Issue 10 (before the prediction table): the API process spent 25 % of its
samples in the plugin, 22 % in ``Predictor.predict_many``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_overhead import add_served_load_arguments, load_average, run_round, throughput_bodies  # noqa: E402

from llmco2_serve.devtools import serverctl  # noqa: E402
from llmco2_serve.devtools.demo import usable_token_ids  # noqa: E402

_HOST_CODE = ("vllm/", "starlette/", "uvicorn/", "fastapi/", "asyncio/", "uvloop/", "zmq/", "torch/")
_PLUGIN_CODE = ("llmco2_serve/", "hooks/")


def _frame_file(frame: str) -> str:
    return frame.rsplit("(", 1)[-1] if "(" in frame else frame


def plugin_own(stack: list[str]) -> bool:
    """The innermost frame that is not NumPy/stdlib is the plugin's (not vLLM's or the web stack's)."""
    for frame in reversed(stack):
        f = _frame_file(frame)
        if any(h in f for h in _HOST_CODE):
            return False
        if any(p in f for p in _PLUGIN_CODE):
            return True
    return False


def analyse(lines: Iterable[str]) -> dict:
    """py-spy ``--format raw`` lines (``frame;frame;... count``)."""
    total = own = 0
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    for line in lines:
        line = line.strip()
        if not line:
            continue
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():  # not a sample (seen: a log line that reached py-spy's raw output)
            continue
        n = int(count_text)
        stack = stack_text.split(";")
        total += n
        if plugin_own(stack):
            own += n
        seen = set()
        for frame in stack:
            name = frame.split(" (")[0] + " (" + _frame_file(frame).split(":")[0]
            if name not in seen:
                seen.add(name)
                inclusive[name] += n
        leaf[stack[-1].split(" (")[0] + " (" + _frame_file(stack[-1]).split(":")[0]] += n
    return {"samples": total, "plugin_own": own, "inclusive": inclusive, "leaf": leaf}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plugin", choices=("on", "off"), default="on")
    add_served_load_arguments(p)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=Path("llmco2-profile"))
    p.add_argument("--raw", type=Path, default=None, help="keep py-spy's raw samples here")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server environment, e.g. LLMCO2_ENERGY_READER=fake-work (the measured path)")
    args = p.parse_args(argv)
    if shutil.which("py-spy") is None:
        p.error("py-spy is not installed: pip install py-spy")
    cpu = serverctl.is_cpu_build()
    args.out.mkdir(parents=True, exist_ok=True)
    from llmco2_serve.devtools.tinymodel import build_tiny_model

    model_dir = str(build_tiny_model(args.out / "model-llama", "llama"))
    vocabulary = usable_token_ids(model_dir)
    raw = args.raw or args.out / f"py-spy-{args.plugin}-{args.max_tokens}.txt"
    env = {**serverctl.default_server_env(cpu=cpu), **serverctl.plugin_env(args.plugin == "on"),
           "LLMCO2_PAIRS_PATH": "", **dict(kv.split("=", 1) for kv in args.env)}
    with serverctl.VllmServer(model_dir, env=env, log_path=args.out / f"vllm-{args.plugin}.log",
                              extra_args=serverctl.default_engine_args(max_model_len=args.max_model_len, cpu=cpu)) as srv:
        name = srv.served_model()
        run_round(srv.base_url, throughput_bodies(name, vocabulary, args.warmup, args.prompt_tokens, args.max_tokens,
                                                  seed=1000), args.concurrency)
        bodies = throughput_bodies(name, vocabulary, args.requests, args.prompt_tokens, args.max_tokens, seed=0)
        spy = subprocess.Popen(["py-spy", "record", "-p", str(srv.pid), "--subprocesses", "--nonblocking",
                                "-f", "raw", "-r", str(args.rate), "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        load0 = load_average()
        stats = run_round(srv.base_url, bodies, args.concurrency)
        load1 = load_average()
        spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
        spy.wait(timeout=60)
    result = analyse(raw.read_text().splitlines())
    n = result["samples"]
    print(f"server with the plugin {args.plugin}: {stats.requests_per_s:.1f} req/s ({args.requests} x {args.max_tokens} "
          f"token(s), concurrency {args.concurrency}), load average {load0} -> {load1}")
    print(f"{n} busy samples over all server processes; the plugin's own code: {result['plugin_own']} "
          f"({result['plugin_own'] / max(n, 1) * 100:.1f} %)")
    print("plugin functions (inclusive share of busy samples):")
    for k, v in result["inclusive"].most_common():
        if any(s in k for s in _PLUGIN_CODE) and v / n >= 0.001:
            print(f"  {v / n * 100:5.1f} %  {k}")
    print("busiest innermost functions:")
    for k, v in result["leaf"].most_common(12):
        print(f"  {v / n * 100:5.1f} %  {k}")
    print(f"raw samples: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
