"""Cut the packaged Azure LLM inference trace slice (llmco2_serve/data/azure_trace_slice.csv).

Run: ``python benchmarks/make_trace_slice.py [--src DIR] [--rows 300] [--out PATH]``.

From each of ``AzureLLMInferenceTrace_code.csv`` and ``AzureLLMInferenceTrace_conv.csv``
(Azure/AzurePublicDataset, 2023 traces, CC-BY 4.0) it keeps ``--rows`` consecutive rows
starting at the middle row (``n_rows // 2``), away from the start of the hour-long trace.
Rows are copied verbatim; two columns are added in front: ``trace`` (``code`` / ``conv``)
and ``row`` (0-based data-row index in the source file). Checks the sources' SHA-256 so
the slice is reproducible from the same files, and prints the slice's statistics next to
the full trace's (for AZURE_TRACE.md).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import statistics
import sys
from pathlib import Path

SOURCES = {
    "code": ("AzureLLMInferenceTrace_code.csv", "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6"),
    "conv": ("AzureLLMInferenceTrace_conv.csv", "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8"),
}
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "azure-llm-trace-2023"
DEFAULT_OUT = REPO / "llmco2_serve" / "data" / "azure_trace_slice.csv"


def _stats(rows: list[dict[str, str]]) -> str:
    ctx = [int(r["ContextTokens"]) for r in rows]
    gen = [int(r["GeneratedTokens"]) for r in rows]
    return (
        f"{len(rows):6d} rows  ContextTokens median {statistics.median(ctx):7.1f} max {max(ctx):6d}  "
        f"GeneratedTokens median {statistics.median(gen):6.1f} max {max(gen):5d}  "
        f"{rows[0]['TIMESTAMP']} .. {rows[-1]['TIMESTAMP']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help=f"folder of the two CSVs (default {DEFAULT_SRC})")
    parser.add_argument("--rows", type=int, default=300, help="consecutive rows per trace (default 300)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of the sources")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error(f"--rows must be >= 1, got {args.rows}")

    out_rows: list[list[str]] = []
    for trace, (name, sha256) in SOURCES.items():
        path = args.src / name
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not args.no_verify and digest != sha256:
            print(f"error: {path} has SHA-256 {digest}, expected {sha256}", file=sys.stderr)
            return 1
        rows = list(csv.DictReader(data.decode("utf-8").splitlines()))
        if tuple(rows[0].keys()) != COLUMNS:
            print(f"error: {path} columns {tuple(rows[0].keys())}, expected {COLUMNS}", file=sys.stderr)
            return 1
        start = len(rows) // 2
        picked = rows[start : start + args.rows]
        print(f"{trace}: full  {_stats(rows)}")
        print(f"{trace}: slice {_stats(picked)}  (rows {start}..{start + len(picked) - 1})")
        out_rows += [[trace, str(start + i), *(r[c] for c in COLUMNS)] for i, r in enumerate(picked)]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["trace", "row", *COLUMNS])
        writer.writerows(out_rows)
    print(f"wrote {len(out_rows)} rows to {args.out} (sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
