"""Cost of `llmco2 retrain` and of the plugin's hot reload (issue 7 part 3). Prints numbers.

1. retrain: N synthetic final pairs of Llama-3.1-8B on H100 (a deployment that is 2x the packaged GNN
   with a batch power law it lacks, 5% noise) + the vllm profile's shipped records; wall time of
   the whole command and of its fine-tuning, for --epochs E.
2. reload: an EnergyService for Llama-3.1-8B (max_num_seqs 256, max_model_len 8192, prediction table
   built at start-up) reloads the published weights while a thread predicts requests in a loop.
   Prints the background build time (load + predictor + table), the swap itself (the reference
   assignments requests can race), and on_request latency while a reload runs vs idle.

    python benchmarks/retrain_reload.py [--pairs 200] [--epochs 150]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources

import numpy as np


def _arch():
    path = resources.files("llmco2_serve.data") / "h200-hf-eager.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["model"] == "llama3.1-8b":
            return r["arch"]
    raise SystemExit("llama3.1-8b not in the packaged records")


def write_pairs(path, n, arch):
    from llmco2_serve.prediction.predictor import Predictor

    p = Predictor.from_config(arch, gpu="H100", dtype="bfloat16", profile="vllm")
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            b, L, g = rng.choice([1, 2, 4, 8, 16, 32, 64]), rng.randint(16, 2000), rng.randint(8, 500)
            pr = p.predict(batch=b, prompt_len=L, gen_tokens=g)
            k = 2.0 * (b / 8) ** 0.3 * math.exp(rng.gauss(0, 0.05))
            pre, dec = pr.prefill_energy_j / b * k * 1.3, pr.decode_energy_j / b * k
            f.write(json.dumps({
                "model": "llama3.1-8b", "arch": arch, "dtype": "bfloat16", "gpu": "H100", "n_gpu": 1, "batch": b,
                "prompt_len": L, "gen_tokens": g, "prefill_energy_j": pre, "decode_energy_j": dec,
                "request_energy_j": pre + dec, "final": True, "share_of_batch": True, "measured_source": "nvml",
                "request_id": f"cmpl-{i}", "engine": "vllm-continuous-batching", "source": "llmco2-serve-plugin"}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=150)
    args = ap.parse_args()
    arch = _arch()
    tmp = tempfile.mkdtemp(prefix="llmco2-retrain-bench-")
    try:
        pairs = os.path.join(tmp, "pairs.jsonl")
        write_pairs(pairs, args.pairs, arch)
        out = os.path.join(tmp, "out")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "llmco2_serve.cli", "retrain", "--pairs", pairs, "--out", out,
                               "--epochs", str(args.epochs), "--json"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr)
            return 1
        rep = json.loads(proc.stdout)
        print(f"retrain: {args.pairs} pairs ({rep['pairs_used']['train']} train, {rep['pairs_used']['held_out']} "
              f"held out) + {rep.get('shipped_records', {}).get('n')} shipped records, {args.epochs} epochs: "
              f"{wall:.1f} s wall for the command (fine-tune {rep.get('timing_s', {}).get('fine_tune')} s, "
              f"prepare {rep.get('timing_s', {}).get('prepare')} s); {rep['status']}; held-out MAPE "
              f"{rep['held_out_before']['mape']:.3f} -> {rep['held_out_after']['mape']:.3f}")
        if rep["status"] != "published":
            return 1

        from llmco2_serve.runtime.service import EnergyService, ModelInfo
        from llmco2_serve.runtime.settings import Settings

        wdir = os.path.join(tmp, "w")
        os.makedirs(wdir)
        base = resources.files("llmco2_serve.data")
        for ext in (".npz", ".json"):
            with resources.as_file(base / ("gnn_weights_vllm" + ext)) as src:
                shutil.copyfile(src, os.path.join(wdir, "current" + ext))
        settings = Settings(weights_path=os.path.join(wdir, "current.npz"), pairs_path=os.path.join(tmp, "p.jsonl"),
                            reload_interval_s=0)
        model = ModelInfo(hf_config=arch, model_name="llama3.1-8b", dtype="bfloat16", max_model_len=8192,
                          max_num_seqs=256)
        svc = EnergyService(settings, model, gpu_names=[], prediction_table="now")
        rng = np.random.default_rng(0)

        def latencies(stop_when, out):
            i = 0
            while not stop_when():
                t = time.perf_counter()
                svc.on_request(f"r{i}", int(rng.integers(1, 8000)), int(rng.integers(1, 190)), int(rng.integers(0, 255)))
                out.append(time.perf_counter() - t)
                svc.forget(f"r{i}")
                i += 1

        idle: list = []
        t_end = time.perf_counter() + 2.0
        latencies(lambda: time.perf_counter() > t_end, idle)
        during: list = []
        done = threading.Event()
        th = threading.Thread(target=latencies, args=(done.is_set, during))
        th.start()
        shutil.copyfile(rep["current"].replace(".npz", ".json"), os.path.join(wdir, "current.json"))
        shutil.copyfile(rep["current"], os.path.join(wdir, "current.npz.tmp"))
        os.replace(os.path.join(wdir, "current.npz.tmp"), os.path.join(wdir, "current.npz"))
        t0 = time.perf_counter()
        ok = svc.check_weights_file()
        build = time.perf_counter() - t0
        done.set()
        th.join()
        svc.close()

        def pct(xs, q):
            return 1e6 * float(np.percentile(xs, q))

        print(f"reload ({'ok' if ok else 'FAILED'}): load + predictor + table in the background {build:.2f} s; "
              f"swap (what a request can race) {1e6 * svc.weights_reload_pause_s:.1f} us")
        print(f"on_request while idle: {len(idle)} calls, p50 {pct(idle, 50):.0f} us, p99 {pct(idle, 99):.0f} us, "
              f"max {pct(idle, 100):.0f} us")
        print(f"on_request during the reload: {len(during)} calls, p50 {pct(during, 50):.0f} us, "
              f"p99 {pct(during, 99):.0f} us, max {pct(during, 100):.0f} us (same 2 cores as the build: "
              f"CPU contention, not a pause)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
