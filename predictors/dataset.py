"""Energy records -> graph samples for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmco2_serve.arch import ModelArch
from llmco2_serve.graph import Parallelism, build_layer_template
from llmco2_serve.hardware import gpu_spec
from llmco2_serve.precision import Precision
from llmco2_serve.records import EnergyRecord

from .features import featurize


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
