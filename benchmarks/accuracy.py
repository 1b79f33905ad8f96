"""Leave-one-architecture-out accuracy of the LLMCO2 GNN and its baselines (paper Tables 3 and 4).

For each ``model`` label in the data, every predictor is trained on all other models and scored
on the held-out one. Prints, as markdown:

* Table 3: request-energy MAPE per held-out model, their mean (the paper's "Mean" column) and the
  pooled value over all rows;
* Table 4: EBA(30/10/5%) in the same layout;
* a per-phase table (prefill, decode) for the predictors that give phases;
* every model/metric where the GNN does NOT beat a baseline on MAPE or EBA(10%);
* rows left out of a metric (non-positive measurements) with their reason.

Usage (from the repository root)::

    python benchmarks/accuracy.py [--data PATH] [--json OUT] [--predictors gnn,llmcarbon,...]
    python benchmarks/accuracy.py --profile vllm     # the packaged vLLM records, leave-one-family-out
    python benchmarks/accuracy.py --profile vllm --predictors gnn --calibrate 3   # + issue 7's calibrated score

``--profile NAME`` scores the packaged records of that engine profile, restricted to the families
its weights are trained on, holding out one model family at a time (``--group family``); rows the
parser cannot model yet are counted and skipped, one line per model on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "energy" / "h200-hf-eager.jsonl"
ALL_PREDICTORS = ("gnn", "llmcarbon", "random-forest", "nnlqp")
LABELS = {"gnn": "LLMCO2 (GNN)", "llmcarbon": "LLMCarbon", "random-forest": "DeepEn (RF)", "nnlqp": "NNLQP"}
BASELINES = ("llmcarbon", "random-forest", "nnlqp")


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _macro_mean(block: dict, key: str) -> float | None:
    """Mean over held-out models of a per-model metric (the paper's "Mean" column)."""
    vals = [m[key] for m in block["per_model"].values() if m[key] is not None]
    return float(np.mean(vals)) if vals else None


def _row(label: str, block: dict, key: str, models: list[str]) -> str:
    cells = [_pct(block["per_model"][m][key]) if m in block["per_model"] else "n/a" for m in models]
    return f"| {label} | " + " | ".join(cells) + f" | {_pct(_macro_mean(block, key))} | {_pct(block[key])} |"


def table3(results: dict, models: list[str]) -> str:
    head = "| Scheme | " + " | ".join(models) + " | Mean | Pooled |"
    sep = "|" + "---|" * (len(models) + 3)
    rows = [_row(LABELS[n], r["evaluation"], "mape", models) for n, r in results.items()]
    return "\n".join(["**Table 3 -- request-energy MAPE, held-out model (lower is better)**", "", head, sep, *rows])


def table4(results: dict, models: list[str]) -> str:
    head = "| Metric | Scheme | " + " | ".join(models) + " | Mean | Pooled |"
    sep = "|" + "---|" * (len(models) + 4)
    rows = []
    for key, title in (("eba_30", "EBA(30%)"), ("eba_10", "EBA(10%)"), ("eba_5", "EBA(5%)")):
        for n, r in results.items():
            rows.append(f"| {title} " + _row(LABELS[n], r["evaluation"], key, models))
    return "\n".join(["**Table 4 -- request-energy error-bound accuracy, held-out model (higher is better)**", "",
                      head, sep, *rows])


def phase_table(results: dict, models: list[str]) -> str:
    phased = {n: r for n, r in results.items() if r["evaluation"]["prefill"] is not None}
    if not phased:
        return "**Per-phase accuracy**: no predictor gives phases."
    head = "| Phase | Metric | Scheme | " + " | ".join(models) + " | Mean | Pooled |"
    sep = "|" + "---|" * (len(models) + 5)
    rows = []
    for phase in ("prefill", "decode"):
        for key, title in (("mape", "MAPE"), ("eba_10", "EBA(10%)"), ("eba_30", "EBA(30%)")):
            for n, r in phased.items():
                rows.append(f"| {phase} | {title} " + _row(LABELS[n], r["evaluation"][phase], key, models))
    return "\n".join(["**Per-phase accuracy (predictors with a prefill/decode split)**", "", head, sep, *rows])


def gnn_shortfalls(results: dict, models: list[str]) -> list[str]:
    """Every (baseline, model or Mean, metric) where the GNN is not strictly better."""
    if "gnn" not in results:
        return []
    g = results["gnn"]["evaluation"]
    out = []
    for b in BASELINES:
        if b not in results:
            continue
        e = results[b]["evaluation"]
        for key, better_is_lower in (("mape", True), ("eba_10", False)):
            cols = [(m, g["per_model"][m][key], e["per_model"][m][key]) for m in models]
            cols.append(("Mean", _macro_mean(g, key), _macro_mean(e, key)))
            cols.append(("Pooled", g[key], e[key]))
            for col, gv, bv in cols:
                if gv is None or bv is None:
                    continue
                worse = gv >= bv if better_is_lower else gv <= bv
                if worse:
                    name = "MAPE" if key == "mape" else "EBA(10%)"
                    out.append(f"- {name}, {col}: GNN {_pct(gv)} vs {LABELS[b]} {_pct(bv)}")
    return out


def exclusions(results: dict) -> list[str]:
    any_result = next(iter(results.values()))["evaluation"]
    out = []
    for phase, block in (("request", any_result), ("prefill", any_result["prefill"]),
                         ("decode", any_result["decode"])):
        if block is None:
            continue
        ex = block["excluded"]
        if ex["count"]:
            reasons = ", ".join(f"{k}: {v}" for k, v in ex["reasons"].items())
            out.append(f"- {phase}: {ex['count']} row(s) left out of the metric ({reasons})")
    return out


def _rows(preds: dict, idx) -> dict:
    """The predictions of rows ``idx`` (each predictor's array, or None)."""
    return {p: (None if v is None else np.asarray(v, np.float64)[idx]) for p, v in preds.items()}


def calibration_block(preds: dict, samples, k: int, calibrator_options: dict | None = None,
                      draws: int = 20) -> dict:
    """``llmco2 eval --calibrate K`` on the held-out predictions, plus a ceiling for its model form.

    ``calibrated``: each deployment's first ``k`` records (file order) feed a fresh calibrator, the
    rest are scored (:func:`evaluate_calibrated`). ``ceiling``: the same correction form (one factor
    times a power of the batch) fitted by least squares in log space to *all* of a deployment's
    records and scored on them: what a calibrator could reach with every operating point seen, so
    the gap between the two is the extrapolation from the first ``k`` points.
    """
    from collections import defaultdict

    from llmco2_serve.prediction.calibration import Calibrator
    from llmco2_serve.predictors.evaluate import deployment_key_of, evaluate_calibrated

    opts = dict(calibrator_options or {})
    make = (lambda key: Calibrator(key, min_observations=1, **opts)) if opts else None  # as evaluate_calibrated's
    r = evaluate_calibrated(preds, samples, k, make_calibrator=make)
    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[deployment_key_of(s.record)].append(i)
    errors = []
    for idx in groups.values():
        if len(idx) <= k:
            continue
        pred = np.asarray(preds["request"], np.float64)[idx]
        meas = np.array([samples[i].request_energy_j for i in idx], np.float64)
        ok = (meas > 0) & (pred > 0)
        x = np.c_[np.ones(int(ok.sum())), np.log([samples[i].record.batch for i, o in zip(idx, ok) if o])]
        coef = np.linalg.lstsq(x, np.log(meas[ok] / pred[ok]), rcond=None)[0]
        errors.extend(np.abs(np.exp(x @ coef) * pred[ok] / meas[ok] - 1.0).tolist())
    worst = []  # each deployment on its own (a fresh calibrator per deployment either way)
    for key, idx in groups.items():
        if len(idx) > k:
            sub = _rows(preds, idx)
            one = evaluate_calibrated(sub, [samples[i] for i in idx], k, make_calibrator=make)
            worst.append((one["mape"], f"{key.model} on {key.n_gpu}x {key.gpu}", one["n"]))
    worst.sort(reverse=True)
    # The same calibrator fed k records drawn at random from each deployment instead of its first k
    # (in this file those are its k smallest batches): what a deployment that has served at several
    # loads gives it. Mean over `draws` seeded shuffles within each deployment.
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(draws):
        order = [i for idx in groups.values() for i in rng.permutation(idx).tolist()]
        sub = _rows(preds, order)
        one = evaluate_calibrated(sub, [samples[i] for i in order], k, make_calibrator=make)
        drawn.append((one["mape"], one["eba_10"]))
    return {"k": k, "n": r["n"], "mape": r["mape"], "eba_10": r["eba_10"], "eba_30": r["eba_30"],
            "random_k": ({"draws": draws, "mape": float(np.mean([m for m, _ in drawn])),
                          "eba_10": float(np.mean([e for _, e in drawn]))} if drawn else None),
            "worst_deployments": [{"deployment": d, "mape": m, "scored": n} for m, d, n in worst[:8]],
            "calibrator_options": opts, "uncalibrated": r["calibration"]["uncalibrated"],
            "per_model_mape": {m: v["mape"] for m, v in r["per_model"].items()},
            "groups_scored": sum(g["status"] == "scored" for g in r["calibration"]["groups"]),
            "ceiling_mape": float(np.mean(errors)) if errors else None}


def run(data: Path, predictors: list[str], seed: int, group: str = "model", families=None,
        calibrate: int | None = None, calibrator_options: dict | None = None) -> dict:
    from llmco2_serve.predictors.dataset import samples_from_records, supported_records
    from llmco2_serve.predictors.evaluate import evaluate, leave_one_architecture_out
    from llmco2_serve.prediction.records import load_records

    records, skipped = supported_records(load_records(data), families=families,
                                         warn=lambda m: print(f"accuracy: {m}", file=sys.stderr))
    samples = samples_from_records(records)
    if group == "family":  # the tables' columns are the held-out groups
        from dataclasses import replace

        samples = [replace(s, model=s.record.group) for s in samples]
    results = {}
    for name in predictors:
        t0 = time.perf_counter()
        preds, folds = leave_one_architecture_out(samples, name, seed=seed, group="model")
        elapsed = time.perf_counter() - t0
        rows = [{"model": s.model, "line": s.record.line, "batch": s.record.batch, "prompt_len": s.record.prompt_len,
                 "gen_tokens": s.record.gen_tokens, "measured_request_energy_j": s.request_energy_j,
                 **{f"predicted_{p}_energy_j": (None if preds[p] is None else float(preds[p][i]))
                    for p in ("prefill", "decode", "request")}}
                for i, s in enumerate(samples)]
        results[name] = {"evaluation": evaluate(preds, samples), "folds": folds, "runtime_s": elapsed,
                         "predictions": rows}
        if calibrate is not None:
            results[name]["calibrated"] = calibration_block(preds, samples, calibrate, calibrator_options)
        print(f"[{name}] {len(folds)} folds in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return {"data": str(data), "seed": seed, "n_samples": len(samples), "group": group,
            "skipped": skipped,
            "models": list(dict.fromkeys(s.model for s in samples)), "results": results}


def report(out: dict) -> str:
    results, models = out["results"], out["models"]
    parts = [
        f"Leave-one-{out.get('group', 'model')}-out on `{out['data']}` ({out['n_samples']} records, {len(models)} "
        f"{out.get('group', 'model')} groups, seed {out['seed']}). Each column: the {out.get('group', 'model')} held out of "
        "training. Mean = mean over the held-out columns (the paper's Mean column); Pooled = over all rows together."
        + (f" Skipped (parser cannot model them yet): " + ", ".join(f"{m} ({v['rows']} rows)"
                                                                    for m, v in out["skipped"].items())
           if out.get("skipped") else ""),
        "", table3(results, models), "", table4(results, models), "", phase_table(results, models), "",
    ]
    short = gnn_shortfalls(results, models)
    if "gnn" in results:
        parts.append("**Where the GNN does NOT beat a baseline (MAPE or EBA(10%))**")
        parts.append("")
        parts.extend(short or ["- nowhere: the GNN is strictly better on every model, the Mean and the pooled rows."])
        parts.append("")
    ex = exclusions(results)
    parts.append("**Rows left out of a metric** (measured value zero or negative, `shared/README.md`)")
    parts.append("")
    parts.extend(ex or ["- none"])
    parts.append("")
    for n, r in results.items():
        c = r.get("calibrated")
        if c:
            u = c["uncalibrated"]
            parts.append(f"**{LABELS[n]}, calibrated on each deployment's first {c['k']} records** ({c['groups_scored']} "
                         f"deployments, {c['n']} rows scored): MAPE {_pct(u['mape'])} -> {_pct(c['mape'])}, "
                         f"EBA(10%) {_pct(u['eba_10'])} -> {_pct(c['eba_10'])}, EBA(30%) {_pct(u['eba_30'])} -> "
                         f"{_pct(c['eba_30'])}; the same correction fitted to all of each deployment's records "
                         f"(ceiling): MAPE {_pct(c['ceiling_mape'])}"
                         + (f"; calibrator options {c['calibrator_options']}" if c.get("calibrator_options") else ""))
            parts.append("")
            rk = c.get("random_k")
            if rk:
                parts.append(f"Calibrated on {c['k']} records drawn at random from each deployment instead "
                             f"(mean of {rk['draws']} draws): MAPE {_pct(rk['mape'])}, EBA(10%) {_pct(rk['eba_10'])}")
                parts.append("")
            parts.append("Calibrated MAPE per held-out group: " + ", ".join(
                f"{m} {_pct(v)}" for m, v in c.get("per_model_mape", {}).items()))
            parts.append("")
            parts.append("Worst calibrated deployments: " + ", ".join(
                f"{w['deployment']} {_pct(w['mape'])} ({w['scored']} rows)" for w in c.get("worst_deployments", [])))
            parts.append("")
    parts.append("Runtime: " + ", ".join(f"{LABELS[n]} {r['runtime_s']:.1f} s" for n, r in results.items()))
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"energy records (default {DEFAULT_DATA})")
    ap.add_argument("--json", type=Path, default=None, help="also write all numbers and predictions here")
    ap.add_argument("--predictors", default=",".join(ALL_PREDICTORS),
                    help=f"comma-separated subset of {','.join(ALL_PREDICTORS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default=None,
                    help="score the packaged records of this engine profile (vllm, hf-eager) instead of --data")
    ap.add_argument("--group", choices=("model", "family"), default=None,
                    help="hold out one model or one family (default: family with --profile, model otherwise)")
    ap.add_argument("--calibrate", type=int, default=None, metavar="K",
                    help="also score the held-out predictions calibrated per deployment on its first K records "
                         "(as `llmco2 eval --calibrate K`), with the ceiling of that correction")
    ap.add_argument("--calibration-prior-sd-slope", type=float, default=None, metavar="SD",
                    help="with --calibrate: the calibrator's prior sd on the batch slopes instead of its default "
                         "(a sensitivity check; the plugin uses the default)")
    ap.add_argument("--calibration-extrapolation-ratio", type=float, default=None, metavar="R",
                    help="with --calibrate: how far beyond the observed batches the calibrator's power law extends "
                         "(inf: no limit) instead of its default (a sensitivity check)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for these small graphs; more oversubscribe 2 cores)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.predictors.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_PREDICTORS]
    if unknown or not names:
        ap.error(f"--predictors: unknown {unknown}; choose from {','.join(ALL_PREDICTORS)}")
    families = None
    if args.profile:
        from importlib import resources

        from llmco2_serve.prediction.predictor import PROFILES

        if args.profile not in PROFILES:
            ap.error(f"--profile: unknown {args.profile!r}; known: {', '.join(PROFILES)}")
        args.data = Path(str(resources.files("llmco2_serve.data") / PROFILES[args.profile]["data"]))
        families = PROFILES[args.profile]["families"]
    group = args.group or ("family" if args.profile else "model")
    if not args.data.is_file():
        ap.error(f"--data: no such file {args.data}")

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    options = {} if args.calibration_prior_sd_slope is None else {"prior_sd_slope": args.calibration_prior_sd_slope}
    if args.calibration_extrapolation_ratio is not None:
        options["extrapolation_ratio"] = args.calibration_extrapolation_ratio
    out = run(args.data, names, args.seed, group=group, families=families, calibrate=args.calibrate,
              calibrator_options=options)
    out["runtime_s"] = time.perf_counter() - t0
    print(report(out))
    print(f"\nTotal runtime {out['runtime_s']:.1f} s (torch threads {args.threads}).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        print(f"Wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
