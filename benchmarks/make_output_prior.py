"""Summarise the Azure LLM inference traces (2023) into the packaged output-length prior.

    python benchmarks/make_output_prior.py [TRACE_DIR] [OUT_JSON]

Defaults: ``../shared/data/azure-llm-trace-2023`` and ``llmco2_serve/data/azure_output_prior.json``.
Data: Azure/AzurePublicDataset, "Azure LLM inference trace 2023", CC-BY 4.0; cite Patel et al.,
"Splitwise: Efficient Generative LLM Inference Using Phase Splitting", ISCA 2024.
Only summary statistics are written (no trace rows), with their provenance.
"""

from __future__ import annotations

import csv
import hashlib
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TRACE_DIR = ROOT.parent / "shared" / "data" / "azure-llm-trace-2023"
DEFAULT_OUT = ROOT / "llmco2_serve" / "data" / "azure_output_prior.json"
TRACES = {"conversation": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def summarise(path: pathlib.Path) -> dict:
    ctx, gen = [], []
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                c, g = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (KeyError, ValueError) as e:
                raise SystemExit(f"{path}:{i}: bad row {row!r}: {e}") from e
            ctx.append(c)
            gen.append(g)
    ctx_a, gen_a = np.asarray(ctx, float), np.asarray(gen, float)
    return {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "n_requests": len(gen),
        "generated_tokens": {
            "mean": round(float(gen_a.mean()), 3),
            "std": round(float(gen_a.std()), 3),
            "quantiles": {str(q): float(np.quantile(gen_a, q)) for q in QUANTILES},
            "max": int(gen_a.max()),
        },
        "context_tokens": {
            "mean": round(float(ctx_a.mean()), 3),
            "quantiles": {str(q): float(np.quantile(ctx_a, q)) for q in QUANTILES},
        },
        # ratio of means: expected generated tokens per context token
        "generated_per_context_token": round(float(gen_a.mean() / ctx_a.mean()), 6),
        "median_generated_per_context_token": round(float(np.median(gen_a / np.maximum(ctx_a, 1))), 6),
    }


def main(argv: list[str]) -> int:
    trace_dir = pathlib.Path(argv[1]) if len(argv) > 1 else DEFAULT_TRACE_DIR
    out = pathlib.Path(argv[2]) if len(argv) > 2 else DEFAULT_OUT
    doc = {
        "what": "output-length prior for llmco2-serve: summary of the Azure LLM inference traces 2023",
        "source": "https://github.com/Azure/AzurePublicDataset (AzureLLMInferenceDataset2023)",
        "license": "CC-BY 4.0",
        "citation": 'Patel et al., "Splitwise: Efficient Generative LLM Inference Using Phase Splitting", ISCA 2024',
        "produced_by": "benchmarks/make_output_prior.py",
        "default_trace": "conversation",
        "traces": {name: summarise(trace_dir / fname) for name, fname in TRACES.items()},
    }
    out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    for name, t in doc["traces"].items():
        print(name, t["n_requests"], "mean gen", t["generated_tokens"]["mean"], "median",
              t["generated_tokens"]["quantiles"]["0.5"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
