"""``llmco2 retrain``: fine-tune an engine profile's GNN on the deployment's own final measurements,
and publish the result only when it predicts the deployment's held-out requests no worse.

Inputs: the pairs file the plugin writes (``LLMCO2_PAIRS_PATH``, rows = records format + the
prediction that was served, service.py ``_keep_pair``) and the profile's packaged records.

* Which pairs: final values of completed requests measured by ``nvml`` (rows written before the
  plugin recorded ``measured_source`` were written for ``nvml`` only). ``fake`` rows (the test-only
  counter, written only with ``LLMCO2_PAIRS_INCLUDE_FAKE=1``) are used only with ``--allow-fake``,
  and the report says so. Estimates (``cpu-estimate-codecarbon``) never.
* Held-out slice: a request is held out when a hash of (seed, its request id) falls below
  ``--holdout``: deterministic, stable when the file grows (a held-out request stays held out in
  later retrains with the same seed), and never used for training.
* Fine-tuning starts from the base weights (the profile's packaged ones, or ``--weights``, e.g.
  the currently served ``DIR/current.npz``) and keeps their feature standardiser, so the inputs
  mean what they meant when the base was trained. Loss: the relative-error loss of
  ``predictors/train.py`` (prefill, decode, request terms), averaged with equal weight over the
  deployment's pairs and the shipped records (``--pairs-weight``): the shipped records keep the
  model from forgetting everything else while the few pairs move it towards this deployment.
* Publishing: ``DIR/gnn_weights-<UTC timestamp>.npz`` + ``.json`` (metadata with the retrain's
  numbers and the npz's sha256), then the pointer ``DIR/current.json`` and ``DIR/current.npz``,
  each written to a temporary file and moved into place with ``os.replace`` (atomic on POSIX).
  The metadata (json) is replaced before the weights (npz): a reader that notices the new npz
  finds its metadata already there; a reader that catches a new json with the old npz sees a
  sha256 mismatch and waits (service.py ``reload_weights``). Refused (held-out MAPE worse, or
  too few held-out pairs to judge): nothing is written, exit status 0, status ``refused``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

PAIR_SOURCES_REAL = ("nvml",)
TEST_ONLY_SOURCES = ("fake",)
CURRENT_NAME = "current"


class RetrainError(ValueError):
    pass


@dataclass
class PairSelection:
    train: list = field(default_factory=list)  # EnergyRecord
    held_out: list = field(default_factory=list)
    rejected: dict = field(default_factory=dict)  # reason -> count
    sources: dict = field(default_factory=dict)  # measured source -> rows used


def request_key(row: dict) -> str:
    """What the held-out split hashes: the request id, else the row itself (older rows)."""
    rid = row.get("request_id")
    if rid:
        return str(rid)
    return json.dumps({k: v for k, v in row.items() if not k.startswith("predict")}, sort_keys=True)


def is_held_out(row: dict, holdout: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{request_key(row)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < holdout


def select_pairs(path: str, *, holdout: float, seed: int, allow_fake: bool = False, warn=None) -> PairSelection:
    """Split the usable pairs of ``path`` into training and held-out records (module docstring)."""
    from llmco2_serve.predictors.dataset import unsupported_reason
    from llmco2_serve.prediction.records import RecordError, is_cut_off_row, parse_record

    if not 0.0 < holdout < 1.0:
        raise RetrainError(f"--holdout must be in (0, 1), got {holdout}")
    sel = PairSelection()
    allowed = PAIR_SOURCES_REAL + (TEST_ONLY_SOURCES if allow_fake else ())
    reasons_by_arch: dict[str, str | None] = {}

    def reject(reason: str) -> None:
        sel.rejected[reason] = sel.rejected.get(reason, 0) + 1

    try:
        f = open(path, "rb")
    except OSError as e:
        raise RetrainError(f"cannot read the pairs file {path}: {e.strerror or e}") from e
    with f:
        for i, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace")
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                reject("cut off by a crashed writer" if is_cut_off_row(text) else "not valid JSON")
                continue
            if not isinstance(row, dict):
                reject("not a JSON object")
                continue
            if row.get("final") is not True:
                reject("not a final value")
                continue
            source = str(row.get("measured_source") or "nvml")  # older rows: written for nvml only
            if source not in allowed:
                reject(f"measured source {source!r} not used" + (
                    " (test-only: --allow-fake)" if source in TEST_ONLY_SOURCES else ""))
                continue
            if row.get("share_of_batch") and isinstance(row.get("batch"), (int, float)) and row["batch"] >= 1:
                # The plugin writes a request's *share* of its batch at the batch's mean size; a
                # record is a batch of `batch` like sequences: the share times the batch size.
                row = dict(row)
                for k in ("prefill_energy_j", "decode_energy_j", "request_energy_j"):
                    if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool):
                        row[k] = row[k] * row["batch"]
            try:
                rec = parse_record(row, f"{path}:{i}", i)
            except RecordError as e:
                reject(f"malformed row ({str(e).split(': ', 1)[-1]})")
                continue
            if not rec.request_energy_j > 0:
                reject("no positive measured energy")
                continue
            akey = json.dumps([rec.arch, rec.dtype, rec.gpu, rec.n_gpu], sort_keys=True)
            if akey not in reasons_by_arch:
                reasons_by_arch[akey] = unsupported_reason(rec)
            if reasons_by_arch[akey] is not None:
                reject(f"unsupported: {reasons_by_arch[akey]}")
                continue
            sel.sources[source] = sel.sources.get(source, 0) + 1
            (sel.held_out if is_held_out(row, holdout, seed) else sel.train).append(rec)
    if warn:
        for reason, n in sorted(sel.rejected.items()):
            warn(f"{path}: {n} row(s) not used: {reason}")
    return sel


def _torch_model_from(trained):
    from llmco2_serve.predictors.features import GLOBAL_FEATURE_NAMES, NODE_FEATURE_NAMES
    from llmco2_serve.predictors.gnn import LLMCO2GNN

    try:  # with the weights' fixed Roofline offset, if they have one (it is not fine-tuned)
        return LLMCO2GNN.from_numpy_weights(trained.weights, len(NODE_FEATURE_NAMES), len(GLOBAL_FEATURE_NAMES))
    except KeyError as e:
        raise RetrainError(f"base {e.args[0]}") from None


def _group_tensors(samples, std, layer_scaled):
    import torch

    from llmco2_serve.predictors.train import _scale, _stack, _targets

    x, ei, batch, gx = _stack(samples)
    pre, dec, req, steps = _targets(samples)
    t = {
        "X": torch.tensor(std.nodes(x), dtype=torch.float32), "G": torch.tensor(std.globals(gx), dtype=torch.float32),
        "EI": torch.tensor(ei, dtype=torch.long), "B": torch.tensor(batch, dtype=torch.long),
        "steps": torch.tensor(steps, dtype=torch.float32),
        "scale": torch.tensor(_scale(samples, layer_scaled), dtype=torch.float32),
        "m_pre": torch.tensor(np.nan_to_num(pre) > 0), "m_dec": torch.tensor((steps > 0) & (np.nan_to_num(dec) > 0)),
        "m_req": torch.tensor(req > 0),
    }
    for name, y, m in (("pre", pre, "m_pre"), ("dec", dec, "m_dec"), ("req", req, "m_req")):
        t["y_" + name] = torch.tensor(np.where(t[m].numpy(), y, 1.0), dtype=torch.float32)
    return t


def _relative_loss(model, t):
    """predictors/train.py's post-warm-up loss: mean |E_hat/E - 1| over the phases that have labels."""
    import torch

    out = model(t["X"], t["EI"], t["B"], t["G"])
    e_pre = torch.exp(out[:, 0].clamp(max=30)) * t["scale"]
    e_dec = torch.exp(out[:, 1].clamp(max=30)) * t["steps"] * t["scale"]
    terms = []
    for e, y, m in ((e_pre, t["y_pre"], t["m_pre"]), (e_dec, t["y_dec"], t["m_dec"]),
                    (e_pre + e_dec, t["y_req"], t["m_req"])):
        if m.any():
            terms.append((e / y - 1).abs()[m].mean())
    return sum(terms) / len(terms)


def fine_tune(base, pair_samples, shipped_samples, *, epochs: int, lr: float, pairs_weight: float, seed: int):
    """A new TrainedGNN: ``base`` fine-tuned for ``epochs`` full-batch Adam steps (module docstring)."""
    import torch

    from llmco2_serve.predictors.train import TrainConfig, TrainedGNN

    torch.set_num_threads(1)  # tiny graphs; keeps a background retrain to one core
    torch.manual_seed(seed)
    model = _torch_model_from(base)
    groups = [(pairs_weight, _group_tensors(pair_samples, base.standardizer, base.config.layer_scaled))]
    if shipped_samples and pairs_weight < 1.0:
        groups.append((1.0 - pairs_weight, _group_tensors(shipped_samples, base.standardizer,
                                                          base.config.layer_scaled)))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=base.config.weight_decay)
    history = []
    for epoch in range(epochs):
        opt.zero_grad()
        loss = sum(w * _relative_loss(model, t) for w, t in groups)
        loss.backward()
        opt.step()
        if epoch % 50 == 0 or epoch == epochs - 1:
            history.append((epoch, float(loss.detach())))
    cfg = TrainConfig(**{**base.config.__dict__, "epochs": epochs, "warmup_epochs": 0, "lr": lr, "seed": seed})
    return TrainedGNN(model.numpy_weights(), base.standardizer, cfg, history)


def _scores(trained, samples) -> dict:
    from llmco2_serve.predictors.evaluate import evaluate
    from llmco2_serve.predictors.train import predict_samples

    r = evaluate(predict_samples(trained, samples), samples)
    return {k: r.get(k) for k in ("n", "mape", "eba_5", "eba_10", "eba_30")}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then os.replace (atomic on POSIX)."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for any file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _npz_bytes(trained) -> bytes:
    import io

    arrays = dict(trained.weights)
    arrays.update(trained.standardizer.to_arrays())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def publish(out_dir: str, trained, metadata: dict, stamp: str) -> dict:
    """Versioned file + atomic ``current`` pointer (module docstring). Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    data = _npz_bytes(trained)
    metadata = dict(metadata, weights_sha256=hashlib.sha256(data).hexdigest())
    meta_bytes = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    versioned = os.path.join(out_dir, f"gnn_weights-{stamp}.npz")
    _atomic_write(os.path.splitext(versioned)[0] + ".json", meta_bytes)
    _atomic_write(versioned, data)
    current = os.path.join(out_dir, CURRENT_NAME + ".npz")
    _atomic_write(os.path.join(out_dir, CURRENT_NAME + ".json"), meta_bytes)  # metadata first (docstring)
    _atomic_write(current, data)
    return {"weights": versioned, "current": current, "weights_sha256": metadata["weights_sha256"]}


def retrain(pairs: str, out_dir: str, *, profile: str | None = None, weights: str | None = None,
            holdout: float = 0.2, seed: int = 0, epochs: int = 150, lr: float = 1e-3, pairs_weight: float = 0.5,
            allow_fake: bool = False, min_held_out: int = 5, min_train: int = 5, warn=None,
            clock=time.time) -> dict:
    """The whole retrain (module docstring); returns the JSON report. Raises RetrainError when the
    inputs cannot be used at all (no usable pairs, unreadable base weights)."""
    from llmco2_serve.prediction.predictor import WeightsError, load_weights, profile_info
    from llmco2_serve.predictors.dataset import samples_from_records, supported_records
    from llmco2_serve.predictors.train import trained_from_embedded
    from llmco2_serve.prediction.records import load_records

    t0 = time.perf_counter()
    if weights and profile:
        raise RetrainError("give --profile or --weights, not both")
    try:
        base_weights = load_weights.__wrapped__(weights) if weights else load_weights(None, profile or "vllm")
    except WeightsError as e:
        raise RetrainError(str(e)) from e
    base_meta = base_weights.metadata
    prof = profile or base_meta.get("profile") or "vllm"
    sel = select_pairs(pairs, holdout=holdout, seed=seed, allow_fake=allow_fake, warn=warn)
    report: dict = {
        "pairs": pairs, "base": weights or f"profile {prof} (packaged)", "base_label": base_weights.label,
        "profile": prof, "holdout": holdout, "seed": seed, "epochs": epochs,
        "pairs_used": {"train": len(sel.train), "held_out": len(sel.held_out), "by_measured_source": sel.sources},
        "pairs_not_used": sel.rejected,
        "test_only_fake_pairs": bool(sel.sources.get("fake")),
    }
    if not sel.train and not sel.held_out:
        raise RetrainError(f"{pairs}: no usable final pairs (not used: {sel.rejected or 'empty file'})")

    def refuse(reason: str) -> dict:
        report.update(status="refused", reason=reason, seconds=round(time.perf_counter() - t0, 3))
        return report

    if len(sel.held_out) < min_held_out:
        return refuse(f"{len(sel.held_out)} held-out pair(s), fewer than {min_held_out}: cannot judge new weights")
    if len(sel.train) < min_train:
        return refuse(f"{len(sel.train)} training pair(s), fewer than {min_train}")
    base = trained_from_embedded(base_weights)
    train_s = samples_from_records(sel.train)
    held_s = samples_from_records(sel.held_out)
    info = profile_info(prof)
    from importlib import resources

    with resources.as_file(resources.files("llmco2_serve.data") / info["data"]) as shipped_path:
        shipped_records = load_records(str(shipped_path), warn=warn)
    shipped, _ = supported_records(shipped_records, families=info["families"],
                                   warn=lambda m: None)
    shipped_s = samples_from_records(shipped)
    t_prep = time.perf_counter() - t0
    before = _scores(base, held_s)
    t1 = time.perf_counter()
    tuned = fine_tune(base, train_s, shipped_s, epochs=epochs, lr=lr, pairs_weight=pairs_weight, seed=seed)
    t_train = time.perf_counter() - t1
    after = _scores(tuned, held_s)
    report.update(held_out_before=before, held_out_after=after,
                  shipped_records={"n": len(shipped_s), "before": _scores(base, shipped_s),
                                   "after": _scores(tuned, shipped_s)},
                  timing_s={"prepare": round(t_prep, 3), "fine_tune": round(t_train, 3)})
    b, a = before["mape"], after["mape"]
    if a is None or b is None or not math.isfinite(a) or a > b:
        return refuse(f"held-out MAPE before {b:.4f} after {a:.4f}" if a is not None and b is not None
                      else "held-out MAPE could not be computed")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock())) + f"-{int(clock() * 1e6) % 1000000:06d}"
    from llmco2_serve.predictors.train import _sha256_of_records

    metadata = dict(base_meta)
    metadata.update(
        train_config=tuned.config.__dict__,
        engine_profile=f"{base_meta.get('engine_profile', '?')}; retrained {stamp} on {len(sel.train)} deployment pairs",
        retrain={"stamp": stamp, "base": report["base"], "base_label": base_weights.label,
                 "pairs_file": os.path.abspath(pairs), "pairs_sha256": _sha256_of_records(sel.train),
                 "train_pairs": len(sel.train), "held_out_pairs": len(sel.held_out),
                 "measured_sources": sel.sources, "test_only_fake_pairs": report["test_only_fake_pairs"],
                 "held_out_before": before, "held_out_after": after, "holdout": holdout, "seed": seed,
                 "epochs": epochs, "pairs_weight": pairs_weight, "shipped_records": len(shipped_s)},
        final_train_loss=tuned.history[-1][1] if tuned.history else None,
        reproduce=f"llmco2 retrain --pairs {pairs} --out {out_dir} " + (
            f"--weights {weights}" if weights else f"--profile {prof}") + f" --holdout {holdout} --seed {seed} "
        f"--epochs {epochs}" + (" --allow-fake" if allow_fake else ""),
    )
    paths = publish(out_dir, tuned, metadata, stamp)
    from llmco2_serve.prediction.predictor import EmbeddedWeights

    report.update(status="published", label=EmbeddedWeights({}, metadata).label, **paths,
                  seconds=round(time.perf_counter() - t0, 3))
    return report


def cmd_retrain(args) -> int:
    """CLI (``llmco2 retrain``): exit 0 when published or refused, 2 on unusable input."""
    def warn(message):
        print(f"llmco2 retrain: warning: {message}", file=sys.stderr)

    profile = None if args.weights else (args.profile or "vllm")
    try:
        report = retrain(args.pairs, args.out, profile=profile, weights=args.weights, holdout=args.holdout,
                         seed=args.seed, epochs=args.epochs, lr=args.lr, pairs_weight=args.pairs_weight,
                         allow_fake=args.allow_fake, min_held_out=args.min_held_out, warn=warn)
    except RetrainError as e:
        print(f"llmco2 retrain: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif report["status"] == "refused":
        print(f"refused: {report['reason']}")
    else:
        b, a = report["held_out_before"], report["held_out_after"]
        print(f"published {report['weights']} -> {report['current']}: held-out MAPE before {b['mape']:.4f} "
              f"after {a['mape']:.4f} on {b['n']} pairs; {report['pairs_used']['train']} training pairs"
              + (" (TEST-ONLY fake counter pairs)" if report["test_only_fake_pairs"] else "")
              + f"; {report['seconds']:.1f} s")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("retrain", help="fine-tune on the deployment's pairs; publish only if held-out error is not worse")
    r.add_argument("--pairs", required=True, help="pairs JSONL written by the plugin (LLMCO2_PAIRS_PATH)")
    r.add_argument("--out", required=True, help="folder for gnn_weights-<time>.npz and the current.npz pointer")
    r.add_argument("--profile", help="engine profile whose packaged weights and records to start from (vllm)")
    r.add_argument("--weights", help="start from this weights file instead (e.g. DIR/current.npz)")
    r.add_argument("--holdout", type=float, default=0.2, help="fraction of requests held out for judging (0.2)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--epochs", type=int, default=150, help="fine-tuning epochs (150)")
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--pairs-weight", type=float, default=0.5,
                   help="share of the loss given to the deployment's pairs; the rest to the shipped records (0.5)")
    r.add_argument("--min-held-out", type=int, default=5, help="refuse when fewer held-out pairs (5)")
    r.add_argument("--allow-fake", action="store_true",
                   help="TEST ONLY: also learn from the fake counter's pairs (source 'fake')")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_retrain)
