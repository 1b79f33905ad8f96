"""Turn kernel graphs into predictor inputs (node features, global features).

Node features (LLMCO2 section 4.1), per kernel node::

    kind one-hot (len(KERNEL_KINDS)) | log1p(d_in), log1p(d_out)
    | prefill: log1p(O), log1p(M), log1p(I), log1p(P / 1e9), log1p(t_roofline / 1 us)
    | decode (per decode step): the same five

Decode features are per decode step (the phase totals divided by N_gT - 1) because the GNN predicts
the energy of one average decode step; the phase energy is that times N_gT - 1 (energy is additive
over steps). Global features: architecture, inference config, whole-request totals and the GPU.
Every magnitude enters as log1p so that models spanning 0.1B-70B parameters share one scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmco2_serve.workload.graph import KERNEL_KINDS, KERNEL_LATENCY_S, LayerTemplate, Segment

PHASE_FEATURES = ("log_ops", "log_mem_bytes", "log_net_bytes", "log_perf_gops", "log_time_us")
NODE_FEATURE_NAMES = (
    tuple(f"kind_{k}" for k in KERNEL_KINDS) + ("log_d_in", "log_d_out")
    + tuple(f"prefill_{f}" for f in PHASE_FEATURES) + tuple(f"decode_step_{f}" for f in PHASE_FEATURES)
)
GLOBAL_FEATURE_NAMES = (
    "weight_bits", "activation_bits", "log_hidden", "log_mlp_width", "log_heads", "log_kv_heads", "log_head_dim",
    "log_layers", "log_vocab", "log_experts", "log_top_k", "log_kernels_per_layer", "unfused_attention",
    "layernorm", "gated_mlp", "log_batch", "log_prompt_len", "log_gen_tokens", "log_decode_steps",
    "log_prefill_flops", "log_prefill_bytes", "log_prefill_net_bytes", "log_prefill_time_us",
    "log_decode_step_flops", "log_decode_step_bytes", "log_decode_step_net_bytes", "log_decode_step_time_us",
    "log_peak_tflops", "log_mem_bw_gb_s", "log_net_bw_gb_s", "log_n_gpu", "log_tdp_w",
)


@dataclass(frozen=True)
class GraphBatch:
    """Features of R requests that share one layer template (one model on one GPU setup).

    ``node_x``: (R, n_nodes, F_node); ``global_x``: (R, F_global); ``edge_index``: (2, E) shared;
    ``decode_steps``: (R,) = N_gT - 1. ``totals``: the whole-request WorkloadTotals.
    """

    node_x: np.ndarray
    global_x: np.ndarray
    edge_index: np.ndarray
    decode_steps: np.ndarray
    totals: object


def _phase_block(costs, per: np.ndarray) -> np.ndarray:
    per = per[:, None]
    return np.stack([
        np.log1p(costs.ops / per),
        np.log1p(costs.memory_bytes / per),
        np.log1p(costs.network_bytes / per),
        np.log1p(costs.performance_ops_per_s / 1e9),
        np.log1p(costs.time_s / per * 1e6),
    ], axis=-1)


def featurize(template: LayerTemplate, batch, prompt_len, gen_tokens, gpu) -> GraphBatch:
    """Features for requests of ``batch`` sequences, ``prompt_len`` prompt and ``gen_tokens`` output tokens."""
    pre_seg = Segment.prefill(batch, prompt_len)
    dec_seg = Segment.decode(batch, prompt_len, gen_tokens)
    pre, dec = template.costs(pre_seg), template.costs(dec_seg)
    totals = template.totals(pre_seg, dec_seg, pre, dec)
    r = pre.ops.shape[0]
    steps = np.broadcast_to(dec_seg.passes, (r,)).astype(np.float64)
    per_step = np.maximum(steps, 1.0)
    n = template.n_nodes
    static = np.concatenate([template.kind_onehot, np.log1p(template.dims)], axis=1)
    node_x = np.concatenate([
        np.broadcast_to(static, (r, n, static.shape[1])),
        _phase_block(pre, np.ones(r)),
        _phase_block(dec, per_step),
    ], axis=-1)

    a, p = template.arch, template.precision
    mlp_width = a.moe_intermediate_size * a.moe_experts_per_token if a.is_moe else a.intermediate_size
    static_global = np.array([
        p.weight_bytes * 8, p.activation_bytes * 8, np.log1p(a.hidden_size), np.log1p(mlp_width),
        np.log1p(a.num_heads), np.log1p(a.num_kv_heads), np.log1p(a.head_dim), np.log1p(a.num_layers),
        np.log1p(a.vocab_size), np.log1p(a.moe_num_experts), np.log1p(a.moe_experts_per_token), np.log1p(n),
        float(template.attention == "unfused"), float(a.norm_type == "layernorm"), float(a.gated_mlp),
    ])
    b = np.broadcast_to(pre_seg.batch, (r,))
    l = np.broadcast_to(pre_seg.tokens, (r,))
    g = np.broadcast_to(np.asarray(gen_tokens, np.float64), (r,))
    dyn = np.stack([
        np.log1p(b), np.log1p(l), np.log1p(g), np.log1p(steps),
        np.log1p(totals.prefill_flops), np.log1p(totals.prefill_bytes), np.log1p(totals.prefill_network_bytes),
        np.log1p(totals.prefill_time_s * 1e6),
        np.log1p(totals.decode_flops / per_step), np.log1p(totals.decode_bytes / per_step),
        np.log1p(totals.decode_network_bytes / per_step), np.log1p(totals.decode_time_s / per_step * 1e6),
    ], axis=-1)
    tp = template.parallelism
    hw = np.array([
        np.log1p(template.peak_ops_per_s / 1e12), np.log1p(template.memory_bandwidth_bytes_per_s / 1e9),
        np.log1p(template.network_bandwidth_bytes_per_s / 1e9), np.log1p(tp.n_gpu), np.log1p(gpu.tdp_w),
    ])
    global_x = np.concatenate([np.broadcast_to(static_global, (r, static_global.size)), dyn,
                               np.broadcast_to(hw, (r, hw.size))], axis=-1)
    return GraphBatch(node_x, global_x, template.edge_index, steps, totals)


# The Roofline energy of a phase at the GPUs' TDP, per transformer layer (the GNN's output unit), as
# a sum of three work terms (and a latency term, below): compute at peak, memory traffic at full
# bandwidth, all-reduce traffic at the interconnect's bandwidth (a sum, not the kernel-wise max of ``log_*_time_us``: the max has kinks
# where a kernel turns compute-bound, which the serving path's interpolated prediction table cannot
# follow to its 2 % bound). Energy = per-GPU time x TDP x GPUs = total work / rate x TDP, so the GPU
# count cancels. Each term: (feature, power) pairs, a unit constant and whether it is already per
# layer (the work features are whole-model totals: divided by the layers when layer-scaled); every
# feature is log1p of a positive magnitude, so log(expm1(.)) is exact.
_OFFSET_TERMS = tuple(
    (phase, ((f"log_{phase}_{work}", 1.0), (rate, -1.0), ("log_tdp_w", 1.0)), unit, False)
    for phase in ("prefill", "decode_step")
    for work, rate, unit in (("flops", "log_peak_tflops", 1e-12), ("bytes", "log_mem_bw_gb_s", 1e-9),
                             ("net_bytes", "log_net_bw_gb_s", 1e-9))
)
# Plus a fixed time per kernel and pass (``graph.KERNEL_LATENCY_S``, 4 us): without it the Roofline
# energy of a step at batch 8 is too small by a factor that shrinks as the batch grows, and a
# held-out model family inherits that wrong batch shape (the vLLM records' measured / predicted fell
# ~1.7x from batch 8 to 64 on the MoE deployments). Per kernel of the layer graph
# (``log_kernels_per_layer``) on every GPU of the step (``log_n_gpu``) at TDP; one pass for the
# prefill, one per decode step.
_OFFSET_TERMS = _OFFSET_TERMS + tuple(
    (phase, (("log_kernels_per_layer", 1.0), ("log_tdp_w", 1.0), ("log_n_gpu", 1.0)), KERNEL_LATENCY_S, True)
    for phase in ("prefill", "decode_step"))


def roofline_offset(standardizer: "Standardizer", layer_scaled: bool = True) -> dict[str, np.ndarray]:
    """The fixed log-space offset of the GNN's two outputs (``gnn.LLMCO2GNN(offset=...)``): the log of
    the Roofline energy at TDP [per layer] of the prefill and of one decode step (compute time +
    memory time + all-reduce time + a fixed time per kernel, x TDP x GPUs), read from the global
    features through ``standardizer`` (the arrays it needs are stored with the weights).

    Why: energy = power x time, and these times already have the batch physics of one engine step
    (weights read once per step and shared by its rows, per-row KV reads and compute, MoE experts
    loaded). What is left to learn, measured / Roofline-at-TDP energy, is a power fraction and an
    efficiency: it varies ~3x over the vLLM records where the energy itself varies ~10^4x.
    """
    terms = []
    for phase, pairs, unit, per_layer in _OFFSET_TERMS:
        if layer_scaled and not per_layer:  # a whole-model total -> per layer
            pairs = pairs + (("log_layers", -1.0),)
        elif not layer_scaled and per_layer:  # per layer -> whole model
            pairs = pairs + (("log_layers", 1.0),)
        terms.append((phase, pairs, unit))
    names = sorted({n for _, pairs, _ in terms for n, _ in pairs}, key=GLOBAL_FEATURE_NAMES.index)
    coef = np.zeros((len(names), len(terms)))
    for t, (_, pairs, _) in enumerate(terms):
        for n, power in pairs:
            coef[names.index(n), t] = power
    i = np.array([GLOBAL_FEATURE_NAMES.index(n) for n in names], np.int64)
    return {"offset_idx": i.astype(np.float64), "offset_coef": coef,
            "offset_bias": np.log([unit for _, _, unit in terms]),
            "offset_mean": np.asarray(standardizer.global_mean, np.float64)[i].copy(),
            "offset_std": np.asarray(standardizer.global_std, np.float64)[i].copy(),
            "offset_out": np.array([0.0 if phase == "prefill" else 1.0 for phase, _, _ in terms])}


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean/std fitted on training data; constant features pass through centred."""

    node_mean: np.ndarray
    node_std: np.ndarray
    global_mean: np.ndarray
    global_std: np.ndarray

    @staticmethod
    def fit(node_rows: np.ndarray, global_rows: np.ndarray) -> "Standardizer":
        def ms(x):
            m, s = x.mean(0), x.std(0)
            return m, np.where(s > 1e-9, s, 1.0)
        nm, ns = ms(node_rows)
        gm, gs = ms(global_rows)
        return Standardizer(nm, ns, gm, gs)

    def nodes(self, x: np.ndarray) -> np.ndarray:
        return (x - self.node_mean) / self.node_std

    def globals(self, x: np.ndarray) -> np.ndarray:
        return (x - self.global_mean) / self.global_std

    def to_arrays(self, prefix: str = "std_") -> dict:
        return {f"{prefix}node_mean": self.node_mean, f"{prefix}node_std": self.node_std,
                f"{prefix}global_mean": self.global_mean, f"{prefix}global_std": self.global_std}

    @staticmethod
    def from_arrays(arrays, prefix: str = "std_") -> "Standardizer":
        return Standardizer(*(np.asarray(arrays[f"{prefix}{k}"]) for k in
                              ("node_mean", "node_std", "global_mean", "global_std")))
