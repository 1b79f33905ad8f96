"""Pool the pairs of several ``serving_overhead.py --json`` runs and compare them with an A/A control.

``serving_overhead.py`` on a 2-vCPU machine gives pair ratios that swing by tens of percent, so one
run's median cannot resolve a 5 % target. This pools the pairs of several on/off runs (each file's
``summary.pair_ratios`` and ``summary.pair_api_cpu_delta_ms``), prints the pooled median with its
95 % sign-test interval, and, given the runs of an A/A control (``--aa``: the plugin off in both
arms, same design), whether the on/off pairs differ from the A/A pairs at all (two-sided
Mann-Whitney U test): a plugin cost the design can see shows up as on/off pairs below the A/A ones.

Run: python benchmarks/compare_overhead_runs.py ON1.json [ON2.json ...] [--aa AA1.json ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_overhead import median_confidence_interval  # noqa: E402


def pooled(paths: Sequence[Path]) -> dict[str, list[float]]:
    """Pair ratios and API-side CPU differences (ms) of every run in ``paths``."""
    out: dict[str, list[float]] = {"ratios": [], "api_ms": []}
    for path in paths:
        summary = json.loads(Path(path).read_text())["summary"]
        out["ratios"] += [float(x) for x in summary["pair_ratios"]]
        out["api_ms"] += [float(x) for x in summary.get("pair_api_cpu_delta_ms") or ()]
    return out


def describe(values: Sequence[float], spec: str) -> str:
    if not values:
        return "-"
    ci = median_confidence_interval(values)
    shown = "no interval (too few)" if ci is None else f"95 % interval {ci[0]:{spec}} .. {ci[1]:{spec}}"
    return f"median {statistics.median(values):{spec}} ({shown}; mean {statistics.mean(values):{spec}}; n {len(values)})"


def differ_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Mann-Whitney U p-value that ``a`` and ``b`` come from one distribution."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="serving_overhead.py --json files of on/off runs")
    p.add_argument("--aa", nargs="*", type=Path, default=[], help="the same of A/A control runs (--aa)")
    args = p.parse_args(argv)
    on = pooled(args.runs)
    print(f"on/off pair ratios: {describe(on['ratios'], '.3f')}")
    print(f"on - off API-server CPU, ms/request: {describe(on['api_ms'], '+.3f')}")
    if args.aa:
        aa = pooled(args.aa)
        print(f"A/A pair ratios (plugin off in both arms): {describe(aa['ratios'], '.3f')}")
        print(f"A/A API-server CPU difference, ms/request: {describe(aa['api_ms'], '+.3f')}")
        for what, key in (("pair ratios", "ratios"), ("API-server CPU differences", "api_ms")):
            pv = differ_p(on[key], aa[key])
            print(f"on/off vs A/A {what}: Mann-Whitney p = {'-' if pv is None else f'{pv:.2f}'} "
                  "(small: the design sees the plugin; large: the plugin's cost is within what it cannot tell apart)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
