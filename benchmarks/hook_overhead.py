"""CPU cost the plugin adds inside vLLM, measured directly (deterministic, unlike end-to-end runs).

* engine core, per step: ``EngineMeter.step_started`` + ``step_finished`` (step weights from the
  predictor, NVML-style counter read, attribution), for 8/32/128 requests per step, with a fake NVML
  whose counter behaves like the real one (mJ, 100 ms updates);
* API server, per request: ``EnergyService.on_request`` (prediction) + ``on_finished`` (span attributes).

Compare with vLLM's own step time (a Llama-3.1-8B decode step at batch 32 on an H100 is ~15-25 ms):
the engine-core cost is serial with the step, so cost / step time is the throughput loss bound.
Run: python benchmarks/hook_overhead.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from llmco2_serve.gpu_energy import FakeEnergyReader, ManualClock
from llmco2_serve.predictor import Predictor
from llmco2_serve.service import EnergyService, EngineMeter, ModelInfo
from llmco2_serve.settings import load_settings

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "architectures": ["LlamaForCausalLM"]}


def engine_step_us(batch: int, steps: int = 2000) -> float:
    clock = ManualClock()
    reader = FakeEnergyReader([300.0], clock=clock)
    meter = EngineMeter(reader, Predictor.from_config(LLAMA_8B, gpu="h100"), clock=clock)
    rng = np.random.default_rng(0)
    ctx = rng.integers(100, 4000, batch)
    cost = 0.0
    for s in range(steps):
        # mostly decode, a prefill chunk every 8th step, requests keep their ids across steps
        rows = [(f"r{i}", "decode", 1, int(ctx[i] + s)) for i in range(batch)]
        if s % 8 == 0:
            rows[0] = (f"p{s}", "prefill", 512, 0)
        t = time.perf_counter()
        meter.step_started(s, rows)
        clock.advance(0.02)
        meter.step_finished(s)
        cost += time.perf_counter() - t
        if s % 8 == 0:
            meter.finished(f"p{s}")
    return cost / steps * 1e6


def api_request_us(n: int = 2000) -> float:
    settings = load_settings({"LLMCO2_PAIRS_PATH": "", "LLMCO2_GPU": "H100"})
    svc = EnergyService(settings, ModelInfo(LLAMA_8B, "llama-3.1-8b", max_model_len=8192, max_num_seqs=256),
                        gpu_names=[])
    measured = {"prefill_energy_j": 1.0, "decode_energy_j": 5.0, "energy_j": 6.0, "uncertainty_j": 0.5,
                "source": "nvml"}
    t = time.perf_counter()
    for i in range(n):
        svc.on_request(f"q{i}", 500 + i % 1000, 256, running_requests=i % 32)
        svc.on_finished(f"q{i}", 128, measured)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    args = ap.parse_args()
    result = {f"engine_step_us_batch_{b}": engine_step_us(b) for b in (8, 32, 128)}
    result["api_per_request_us"] = api_request_us()
    for b in (8, 32, 128):
        us = result[f"engine_step_us_batch_{b}"]
        print(f"engine core, {b:3d} requests/step: {us:7.1f} us per step "
              f"({us / 200:.2f}% of a 20 ms GPU step)")
    print(f"API server, per request (predict + span attributes): {result['api_per_request_us']:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
