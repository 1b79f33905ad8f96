"""Which per-deployment correction form extrapolates best from a few operating points (issue 7)?

Reads the held-out GNN predictions that ``benchmarks/accuracy.py --json`` writes and fits, per
deployment (model, GPU, GPU count, dtype), each candidate correction of ``r = measured / predicted``
as a function of the batch ``b`` by plain least squares (not the plugin's calibrator: no prior, no
robust weights; that one is scored by ``accuracy.py --calibrate K``). For each form it prints the
request-energy MAPE

* ceiling: fitted to all of a deployment's records and scored on them;
* first K: fitted to the deployment's first K records in file order (its K smallest batches in the
  shipped ML.ENERGY file), scored on the rest;
* random K: fitted to K records drawn at random, scored on the rest (mean of ``--draws`` draws);

and then, for two of the forms fitted to a deployment's first K records, how far its other
records' error is from that fit, octave by octave of the batch, with the MAPE of an oracle that
also removes each octave's mean over all deployments: what is left is the spread between
deployments, which no population-wide refinement of that form can remove.

Usage::

    python benchmarks/accuracy.py --profile vllm --predictors gnn --json /tmp/acc.json
    python benchmarks/calibration_forms.py /tmp/acc.json [--k 3] [--draws 20]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(x, y, rcond=None)[0]


def fit(form: str, b: np.ndarray, p: np.ndarray, m: np.ndarray, g: np.ndarray):
    """A function (b, p, g) -> corrected prediction, fitted on arrays of batch, predicted J,
    measured J and output tokens."""
    y = np.log(m / p)
    if form == "constant factor":
        a = float(y.mean())
        return lambda b2, p2, g2: p2 * math.exp(a)
    if form in ("power law", "power law held 2x"):
        a, s = _lstsq(np.c_[np.ones_like(b), np.log(b)], y)
        lo, hi = (b.min() / 2, b.max() * 2) if form.endswith("2x") else (0.0, math.inf)
        return lambda b2, p2, g2: p2 * math.exp(a + s * math.log(min(max(b2, lo), hi)))
    if form == "log r = a + c/b":
        a, c = _lstsq(np.c_[np.ones_like(b), 1.0 / b], y)
        return lambda b2, p2, g2: p2 * math.exp(a + c / b2)
    if form == "r = a + c/b":  # relative-error weights: each row's residual is a relative error
        r = m / p
        w = 1.0 / r
        a, c = _lstsq(np.c_[np.ones_like(b), 1.0 / b] * w[:, None], r * w)
        return lambda b2, p2, g2: p2 * max(a + c / b2, 1e-3)
    if form == "M = a P + c G":  # a fixed energy per decode step (G steps per request record)
        w = 1.0 / m
        a, c = _lstsq(np.c_[p, g] * w[:, None], m * w)
        return lambda b2, p2, g2: max(a * p2 + c * g2, 1e-3 * p2)
    raise ValueError(form)


FORMS = ("constant factor", "power law", "power law held 2x", "log r = a + c/b", "r = a + c/b", "M = a P + c G")


def deployments(accuracy_json: Path) -> list[list[tuple[float, float, float, float]]]:
    """Rows (batch, predicted J, measured J, output tokens) per deployment, in file order."""
    d = json.loads(accuracy_json.read_text())
    data = Path(d["data"]) if Path(d["data"]).is_absolute() else REPO / d["data"]
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    groups: OrderedDict = OrderedDict()
    for p in d["results"]["gnn"]["predictions"]:
        r = records[p["line"] - 1]
        if not (p["predicted_request_energy_j"] > 0 and p["measured_request_energy_j"] > 0):
            continue
        groups.setdefault((r["model"], r["gpu"], r["n_gpu"], r["dtype"]), []).append(
            (float(p["batch"]), p["predicted_request_energy_j"], p["measured_request_energy_j"], float(r["gen_tokens"])))
    return list(groups.values())


def score(form: str, groups, k: int | None, draws: int = 0, seed: int = 0) -> tuple[float, float]:
    """(MAPE, EBA(10%)) of ``form`` fitted on ``k`` records per deployment (None: all; ``draws`` > 0:
    drawn at random) and scored on the rest."""
    rng = np.random.default_rng(seed)
    errors: list[float] = []
    for rows in groups:
        if k is not None and len(rows) <= k:
            continue
        for _ in range(max(draws, 1)):
            order = rng.permutation(len(rows)).tolist() if draws else list(range(len(rows)))
            train = [rows[i] for i in order[:k]] if k is not None else rows
            test = [rows[i] for i in order[k:]] if k is not None else rows
            f = fit(form, *(np.array(c) for c in zip(*train)))
            errors += [abs(f(b, p, g) / m - 1.0) for b, p, m, g in test]
    e = np.array(errors)
    return float(e.mean()), float((e <= 0.1).mean())


def spread_beyond_first_k(groups, k: int, form: str) -> tuple[list[tuple[int, int, float, float]], float]:
    """How far a deployment's error moves away from what ``form`` fitted to its first ``k``
    records says.

    For every record after the first ``k`` of its deployment: ``delta = log(measured / corrected)``,
    ``corrected`` being ``form`` fitted to the first ``k``. Returns rows (batch octave ``2**j``,
    count, mean delta, sd of delta) and the MAPE of an *oracle* that also knows, per batch octave,
    the mean delta over all deployments (what a population-wide correction of ``form`` could add):
    its error is the spread between deployments alone."""
    by_octave: dict[int, list[float]] = {}
    for rows in groups:
        if len(rows) <= k:
            continue
        f = fit(form, *(np.array(c) for c in zip(*rows[:k])))
        for b, p, m, g in rows[k:]:
            by_octave.setdefault(int(math.log2(b)), []).append(math.log(m / f(b, p, g)))
    table, errors = [], []
    for j in sorted(by_octave):
        d = np.array(by_octave[j])
        table.append((2 ** j, len(d), float(d.mean()), float(d.std())))
        errors += np.abs(np.exp(-(d - d.mean())) - 1.0).tolist()
    return table, float(np.mean(errors))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("accuracy_json", type=Path, help="output of benchmarks/accuracy.py --predictors gnn --json")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args(argv)
    groups = deployments(args.accuracy_json)
    print(f"| correction of the held-out GNN ({len(groups)} deployments) | ceiling MAPE | first {args.k}: MAPE, "
          f"EBA(10%) | random {args.k} ({args.draws} draws): MAPE, EBA(10%) |")
    print("|---|---|---|---|")
    for form in FORMS:
        c, _ = score(form, groups, None)
        f_m, f_e = score(form, groups, args.k)
        r_m, r_e = score(form, groups, args.k, draws=args.draws)
        print(f"| {form} | {100 * c:.1f}% | {100 * f_m:.1f}%, {100 * f_e:.1f}% | {100 * r_m:.1f}%, {100 * r_e:.1f}% |")
    for form in ("constant factor", "power law held 2x"):
        table, oracle = spread_beyond_first_k(groups, args.k, form)
        print(f"\n{form} fitted to a deployment's first {args.k} records: log(measured / corrected) of its other "
              f"records, by batch octave over all deployments\n")
        print("| batch octave | records | mean | sd |")
        print("|---|---|---|---|")
        for octave, n, mean, sd in table:
            print(f"| {octave} | {n} | {mean:+.2f} | {sd:.2f} |")
        print(f"\nWith each octave's mean over all deployments removed as well (an oracle): MAPE {100 * oracle:.1f}%, "
              f"the spread between deployments alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
