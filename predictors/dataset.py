"""Energy records -> graph samples for training and evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from llmco2_serve.workload.arch import ModelArch
from llmco2_serve.workload.graph import Parallelism, build_layer_template
from llmco2_serve.hardware.gpus import gpu_spec
from llmco2_serve.workload.precision import Precision
from llmco2_serve.prediction.records import EnergyRecord

from .features import featurize

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphSample:
    """One measured request as a graph. Targets are NaN where the record has no usable value."""

    model: str
    node_x: np.ndarray  # (n_nodes, F_node)
    global_x: np.ndarray  # (F_global,)
    edge_index: np.ndarray  # (2, E)
    decode_steps: float
    prefill_energy_j: float
    decode_energy_j: float
    request_energy_j: float
    totals: dict  # whole-request graph totals (for the FLOP-count baseline)
    layers: int
    record: EnergyRecord


def template_for_record(rec: EnergyRecord):
    arch = ModelArch.from_hf_config(rec.arch)
    gpu = gpu_spec(rec.gpu)
    prec = Precision.from_name(rec.dtype)
    return build_layer_template(arch, prec, gpu, Parallelism(tensor_parallel=rec.n_gpu), attention=rec.attention), gpu


def sample_from_record(rec: EnergyRecord) -> GraphSample:
    template, gpu = template_for_record(rec)
    gb = featurize(template, rec.batch, rec.prompt_len, rec.gen_tokens, gpu)
    t = gb.totals
    totals = {k: float(np.asarray(getattr(t, k)).reshape(-1)[0]) for k in
              ("prefill_flops", "decode_flops", "prefill_bytes", "decode_bytes", "prefill_time_s", "decode_time_s")}
    nan = float("nan")
    return GraphSample(
        model=rec.model,
        node_x=gb.node_x[0], global_x=gb.global_x[0], edge_index=gb.edge_index,
        decode_steps=float(gb.decode_steps[0]),
        prefill_energy_j=rec.prefill_energy_j if rec.prefill_energy_j is not None else nan,
        decode_energy_j=rec.decode_energy_j if rec.decode_energy_j is not None else nan,
        request_energy_j=rec.request_energy_j,
        totals=totals, layers=template.arch.num_layers, record=rec,
    )


def samples_from_records(records) -> list[GraphSample]:
    return [sample_from_record(r) for r in records]


def unsupported_reason(rec: EnergyRecord) -> str | None:
    """Why the graph cannot be built for ``rec`` today (None: it can).

    A ``model_type`` the parser does not model as a family is refused here too: the parser would
    accept it as a standard decoder (an extrapolation, with a warning) and price an MoE or a hybrid
    Mamba model as something it is not, which is no ground to train or score on.
    """
    from llmco2_serve.workload.arch import ArchitectureError
    from llmco2_serve.hardware.gpus import GPUSpecError, UnknownGPUError, UnsupportedDtypeError
    from llmco2_serve.workload.precision import PrecisionError

    model_type = rec.arch.get("model_type")
    arch_log = logging.getLogger("llmco2_serve.workload.arch")
    level = arch_log.level
    arch_log.setLevel(logging.ERROR)  # the parser's "unknown family, extrapolating" warning: said below instead
    try:
        if not ModelArch.from_hf_config(rec.arch).known_family:
            return f"architecture {model_type!r} is not modelled by the parser yet"
        template_for_record(rec)
    except (ArchitectureError, UnknownGPUError, GPUSpecError, UnsupportedDtypeError, PrecisionError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        arch_log.setLevel(level)
    return None


def supported_records(records, *, warn=None, families=None) -> tuple[list[EnergyRecord], dict[str, dict]]:
    """Records the graph can be built for, and the skipped ones per model: ``{model: {"rows", "reason"}}``.

    Every skipped model is reported through ``warn`` (one message per model, with its row count and
    reason); nothing is dropped silently. Raises ValueError when no record is left.
    """
    keep, skipped = [], {}
    reasons: dict[tuple, str | None] = {}
    for r in records:
        key = (r.model, json.dumps(r.arch, sort_keys=True), r.dtype, r.gpu, r.n_gpu)
        if key not in reasons:
            reasons[key] = unsupported_reason(r)
        reason = reasons[key]
        if reason is None and families is not None and r.group not in families:
            reason = f"family {r.group!r} is not in this profile's training families {sorted(families)}"
        if reason is None:
            keep.append(r)
        else:
            entry = skipped.setdefault(r.model, {"rows": 0, "reason": reason})
            entry["rows"] += 1
    for model, entry in skipped.items():
        (warn or _log.warning)(f"skipped {entry['rows']} row(s) of model {model!r}: {entry['reason']}")
    if not keep:
        raise ValueError(f"no record has an architecture the parser supports ({len(records)} row(s) skipped)")
    return keep, skipped
