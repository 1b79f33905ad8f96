"""Per-request prediction cost: single-request latency (warm cache), batched throughput, memory,
and the server's hot path.

Targets (issue 2): p99 <= 1 ms single, >= 5,000 requests/s batched, < 200 MB resident.
Server hot path (issue 10): ``EnergyService.on_request`` answers from the prediction table
(``llmco2_serve/prediction/fast_predict.py``) built at start-up: its build time, its error against the GNN on
random points, and the per-request cost of ``on_request`` with the table and without it (target:
<= 0.1 ms mean).
Run: python benchmarks/predict_overhead.py [--model-config DIR] [--gpu NAME] [--n 5000]
[--max-model-len 8192] [--max-num-seqs 256] [--json OUT]
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
    ap.add_argument("--max-model-len", type=int, default=8192, help="server hot path: vLLM's max_model_len")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="server hot path: vLLM's max_num_seqs")
    ap.add_argument("--json")
    args = ap.parse_args()

    rss_start = _rss_mb()
    t0 = time.perf_counter()
    from llmco2_serve.prediction.predictor import Predictor  # imports numpy/torch-free inference path

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
    hot = server_hot_path(args.model_config or LLAMA_8B, args.gpu, args.n, args.max_model_len, args.max_num_seqs)

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
        "server_hot_path": hot,
    }
    print(f"predictor build (cold, incl. imports): {build_s * 1e3:.0f} ms")
    print(f"single request, warm: p50 {result['single_p50_ms']:.3f} ms  p99 {result['single_p99_ms']:.3f} ms  "
          f"(target p99 <= 1 ms)  [{args.n} requests]")
    print(f"batched: {batched_rps:,.0f} requests/s (target >= 5,000)  [{args.batch_size} per call]")
    print(f"memory: RSS {rss_start:.0f} MB before import, {rss_loaded:.0f} MB after build, peak {peak_mb:.0f} MB "
          f"(target < 200 MB for the predictor)")
    t = hot["table"]
    print(f"server hot path: prediction table {t['points']} points (batch <= {args.max_num_seqs}, lengths <= "
          f"{args.max_model_len}) built in {t['build_s']:.2f} s, {t['bytes'] / 1e6:.1f} MB; vs the GNN on "
          f"{t['check_points']} random points: max relative error {t['max_rel_error']:.2%}, p99 {t['p99_rel_error']:.2%}")
    print(f"  table lookup (expected + max_tokens): p50 {hot['lookup_p50_us']:.1f} us  p99 {hot['lookup_p99_us']:.1f} us")
    print(f"  EnergyService.on_request with the table: mean {hot['on_request_table_mean_us']:.1f} us  "
          f"p99 {hot['on_request_table_p99_us']:.1f} us (target mean <= 100 us); without it (GNN per request): "
          f"mean {hot['on_request_direct_mean_us']:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def server_hot_path(model_config, gpu: str, n: int, max_model_len: int, max_num_seqs: int) -> dict:
    """What the API server pays per request: EnergyService.on_request, with and without the table."""
    from llmco2_serve.workload.arch import load_hf_config
    from llmco2_serve.prediction.fast_predict import PredictionTable, measure_error
    from llmco2_serve.runtime.service import EnergyService, ModelInfo
    from llmco2_serve.runtime.settings import load_settings

    cfg = dict(model_config) if isinstance(model_config, dict) else load_hf_config(model_config)
    info = ModelInfo(cfg, "bench", max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    settings = load_settings({"LLMCO2_PAIRS_PATH": "", "LLMCO2_GPU": gpu})
    svc = EnergyService(settings, info, gpu_names=[], prediction_table="now")
    direct = EnergyService(settings, info, gpu_names=[], prediction_table="off")
    table: PredictionTable = svc.table
    err = measure_error(table, svc.predictor, 2000, seed=1)
    rng = np.random.default_rng(1)
    prompts = rng.integers(1, max_model_len // 2, n).tolist()
    max_tokens = rng.integers(1, max_model_len // 2, n).tolist()
    running = rng.integers(0, max_num_seqs, n).tolist()

    def timed(f, count):
        lat = np.empty(count)
        for i in range(count):
            t = time.perf_counter()
            f(i)
            lat[i] = time.perf_counter() - t
        return lat * 1e6

    lookup = timed(lambda i: table.shares(running[i] % max_num_seqs + 1, prompts[i], (64, max_tokens[i])), n)
    gc.collect()
    with_table = timed(lambda i: (svc.on_request(f"r{i}", prompts[i], max_tokens[i], running[i]), svc.forget(f"r{i}")), n)
    without = timed(lambda i: (direct.on_request(f"r{i}", prompts[i], max_tokens[i], running[i]),
                               direct.forget(f"r{i}")), min(n, 1000))
    return {
        "table": {"points": table.n_points, "build_s": table.build_s, "bytes": table.n_points * 4 * 8,
                  "max_rel_error": err["max"], "p99_rel_error": err["p99"], "mean_rel_error": err["mean"],
                  "check_points": err["n"]},
        "lookup_p50_us": float(np.percentile(lookup, 50)), "lookup_p99_us": float(np.percentile(lookup, 99)),
        "on_request_table_mean_us": float(with_table.mean()),
        "on_request_table_p99_us": float(np.percentile(with_table, 99)),
        "on_request_direct_mean_us": float(without.mean()),
    }


if __name__ == "__main__":
    main()
