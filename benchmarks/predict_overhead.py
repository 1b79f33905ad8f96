"""Per-request prediction cost: single-request latency (warm cache), batched throughput, memory.

Targets (issue 2): p99 <= 1 ms single, >= 5,000 requests/s batched, < 200 MB resident.
Run: python benchmarks/predict_overhead.py [--model-config DIR] [--gpu NAME] [--n 5000] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-config", help="HF config.json / model folder (default: Llama-3.1-8B fields)")
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--n", type=int, default=5000, help="single-request predictions to time")
    ap.add_argument("--batch-size", type=int, default=2048, help="requests per predict_many call")
    ap.add_argument("--json")
    args = ap.parse_args()

    rss_start = _rss_mb()
    t0 = time.perf_counter()
    from llmco2_serve.predictor import Predictor  # imports numpy/torch-free inference path

    predictor = Predictor.from_config(args.model_config or LLAMA_8B, gpu=args.gpu)
    build_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()

    rng = np.random.default_rng(0)
    prompts = rng.integers(16, 4096, args.n)
    gens = rng.integers(1, 600, args.n)
    for i in range(200):  # warm caches
        predictor.predict(prompt_len=int(prompts[i]), gen_tokens=int(gens[i]))
    gc.collect()
    lat = np.empty(args.n)
    for i in range(args.n):
        t = time.perf_counter()
        predictor.predict(prompt_len=int(prompts[i]), gen_tokens=int(gens[i]))
        lat[i] = time.perf_counter() - t

    bp = rng.integers(16, 4096, args.batch_size)
    bg = rng.integers(1, 600, args.batch_size)
    predictor.predict_many(bp[:100], bg[:100])
    reps = 5
    t = time.perf_counter()
    for _ in range(reps):
        predictor.predict_many(bp, bg)
    batched_rps = reps * args.batch_size / (time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    result = {
        "single_p50_ms": float(np.percentile(lat, 50) * 1e3),
        "single_p99_ms": float(np.percentile(lat, 99) * 1e3),
        "single_max_ms": float(lat.max() * 1e3),
        "batched_requests_per_s": float(batched_rps),
        "build_s": build_s,
        "rss_before_import_mb": rss_start,
        "rss_after_build_mb": rss_loaded,
        "peak_rss_mb": peak_mb,
        "n_single": args.n,
        "batch_size": args.batch_size,
    }
    print(f"predictor build (cold, incl. imports): {build_s * 1e3:.0f} ms")
    print(f"single request, warm: p50 {result['single_p50_ms']:.3f} ms  p99 {result['single_p99_ms']:.3f} ms  "
          f"(target p99 <= 1 ms)  [{args.n} requests]")
    print(f"batched: {batched_rps:,.0f} requests/s (target >= 5,000)  [{args.batch_size} per call]")
    print(f"memory: RSS {rss_start:.0f} MB before import, {rss_loaded:.0f} MB after build, peak {peak_mb:.0f} MB "
          f"(target < 200 MB for the predictor)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
