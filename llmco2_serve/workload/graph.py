"""Per-layer kernel graph (LLMCO2 section 4.1, Fig. 8 and Appendix A).

A transformer layer becomes a DAG whose nodes are kernels and whose edges are data dependencies.
Each node carries, for prefill and for decode: its kernel type, dimensions, operations O, memory
bytes M, network bytes I, and Roofline performance P (Eq. 8) on the target GPU.

Cost model. Every node's O, M and I are linear in five segment quantities (see ``kernels``):

    bt      = batch * tokens              (token rows processed)
    bpairs  = batch * attention pairs     (causal query-key pairs)
    bkv     = batch * KV-cache rows read (decode: the context of every step; prefill: once per
              pass for unfused attention, once per query tile for flash attention)
    passes  = forward passes              (each re-reads the weights)
    xpasses = passes * expected unique experts loaded per pass (MoE only)

so a :class:`LayerTemplate`, built once per (model, GPU, precision, parallelism) and cached,
stores per-node coefficients obtained by evaluating the paper's equations on unit segments. Costs for
any number of requests are then one small matrix product, cheap enough for every request in a
server. ``tests/test_graph.py`` checks the coefficient form against direct evaluation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from llmco2_serve.workload import kernels as K
from llmco2_serve.workload.arch import ModelArch
from llmco2_serve.workload.precision import Precision

KERNEL_KINDS = (
    "norm", "q_proj", "k_proj", "v_proj", "qk_norm", "attention", "matmul_qk", "softmax", "matmul_sv",
    "o_proj", "add", "gate_proj", "up_proj", "act", "down_proj", "router", "expert_gate_proj",
    "expert_up_proj", "expert_act", "expert_down_proj", "all_reduce",
)
KIND_INDEX = {k: i for i, k in enumerate(KERNEL_KINDS)}
# Kinds whose operations are matrix multiplications (what torch's FlopCounterMode counts).
MATMUL_KINDS = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router", "attention",
    "matmul_qk", "matmul_sv", "expert_gate_proj", "expert_up_proj", "expert_down_proj",
})
SEGMENT_VARS = ("bt", "bpairs", "bkv", "passes", "xpasses")
FLASH_QUERY_TILE = 128  # query rows per flash-attention tile (FlashAttention-2 forward default)
# A fixed time per kernel of the layer graph and forward pass, on every GPU: launch, ramp-up and
# tail of a kernel, the latency of a small all-reduce. A kernel on an H100/B200 takes a few
# microseconds however little it does, which is what a small-batch decode step mostly is. Used by
# the GNN's Roofline offset (predictors/features.py). Not by the engine meter's row split
# (step_costs.py): adding it there as a shared part split evenly moved prefill energy onto the decode
# rows of mixed steps (tests/test_attribution_sim.py's preemption case: prefill 30 % low) and did not
# make the engine's step joules agree better with the request predictions.
KERNEL_LATENCY_S = 4e-6


@dataclass(frozen=True)
class KernelNode:
    name: str
    kind: str
    d_in: int
    d_out: int
    parents: tuple[str, ...]
    weight_params: int  # parameters this kernel reads (per layer, all GPUs together)
    # Layers that have this kernel; 0: every layer. Mixed dense/MoE models (DeepSeek-V3, Llama-4
    # Maverick) average their two kinds of layer into one graph: a node present in k of L layers has
    # its costs scaled by k / L (the whole-model totals multiply by L again), its parameters by k.
    layers: int = 0

    def layer_share(self, num_layers: int) -> float:
        return self.layers / num_layers if self.layers else 1.0


@dataclass(frozen=True)
class Parallelism:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

    @property
    def n_gpu(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


def weight_params_per_layer(arch: ModelArch) -> int:
    """Parameters of one layer that has every node (all layers, unless dense and MoE layers mix)."""
    return sum(n.weight_params for n in _layer_nodes(arch, attention="fused", tensor_parallel=1))


def weight_params_all_layers(arch: ModelArch) -> int:
    """Parameters of all decoder layers (each node's per-layer parameters times the layers having it)."""
    return sum(n.weight_params * (n.layers or arch.num_layers)
               for n in _layer_nodes(arch, attention="fused", tensor_parallel=1))


# Kinds whose parameters are not a d_in x d_out matrix (norm gains, attention sinks).
_NON_MATRIX_KINDS = ("norm", "qk_norm", "attention", "matmul_qk", "softmax", "matmul_sv", "add", "act",
                     "expert_act", "all_reduce")


def _layer_nodes(arch: ModelArch, *, attention: str, tensor_parallel: int) -> list[KernelNode]:
    h, q, kv = arch.hidden_size, arch.q_size, arch.kv_size
    norm_params = h * (2 if arch.norm_type == "layernorm" else 1)
    qkv_bias = arch.attention_bias in ("qkv", "all")
    out_bias = arch.attention_bias == "all"
    nodes: list[KernelNode] = []

    def add(name, kind, d_in, d_out, parents, params=None, layers=0):
        if params is None:
            params = d_in * d_out if kind not in _NON_MATRIX_KINDS else 0
        nodes.append(KernelNode(name, kind, int(d_in), int(d_out), tuple(parents), int(params), int(layers)))
        return name

    if attention not in ("fused", "unfused"):
        raise ValueError(f"attention must be 'fused' or 'unfused', got {attention!r}")
    sinks = arch.num_heads if arch.attention_sinks else 0  # gpt-oss: one learned logit per head
    x = add("norm_attn", "norm", h, h, (), norm_params)
    if arch.is_mla:
        # DeepSeek MLA: low-rank query (q_a -> RMSNorm -> q_b), one latent per token (kv_a: the
        # kv_lora_rank latent + the shared rope key, what the KV cache stores), expanded per head by
        # kv_b into the nope keys and the values. Kinds reuse q_proj/k_proj/v_proj/norm (the GNN's
        # node vocabulary); _node_cost tells the MLA nodes apart by name.
        qr, r, rope = arch.mla_q_lora_rank, arch.mla_kv_lora_rank, arch.mla_rope_dim
        if qr:
            qa = add("q_a_proj", "q_proj", h, qr, (x,))
            qa = add("q_a_norm", "norm", qr, qr, (qa,), qr)
            qn = add("q_b_proj", "q_proj", qr, q, (qa,))
        else:
            qn = add("q_proj", "q_proj", h, q, (x,))
        kva = add("kv_a_proj", "k_proj", h, r + rope, (x,))
        kvn = add("kv_a_norm", "norm", r, r, (kva,), r)
        nope = arch.head_dim - rope
        # Unfused (HF eager) expands every cached latent at every pass; fused (vLLM) expands only the
        # new tokens (prefill) or absorbs kv_b into the query and output (decode): same FLOPs per token.
        kn = vn = add("kv_b_proj" if attention == "fused" else "kv_b_proj_ctx", "v_proj", r,
                      arch.num_heads * (nope + arch.value_head_dim), (kvn,))
    else:
        qn = add("q_proj", "q_proj", h, q, (x,), h * q + (q if qkv_bias else 0))
        kn = add("k_proj", "k_proj", h, kv, (x,), h * kv + (kv if qkv_bias else 0))
        vn = add("v_proj", "v_proj", h, kv, (x,), h * kv + (kv if qkv_bias else 0))
    if arch.qk_norm:
        qn = add("q_norm", "qk_norm", arch.head_dim, arch.head_dim, (qn,), arch.head_dim)
        kn = add("k_norm", "qk_norm", arch.head_dim, arch.head_dim, (kn,), arch.head_dim)
    vd = arch.value_head_dim
    if attention == "fused":
        a = add("attention", "attention", arch.head_dim, vd, (qn, kn, vn) if kn != vn else (qn, kn), sinks)
    else:
        s = add("matmul_qk", "matmul_qk", arch.head_dim, 0, (qn, kn))
        p = add("softmax", "softmax", 0, 0, (s,), sinks)
        a = add("matmul_sv", "matmul_sv", 0, vd, (p, vn))
    q_out = arch.num_heads * vd
    o = add("o_proj", "o_proj", q_out, h, (a,), q_out * h + (h if out_bias else 0))
    if tensor_parallel > 1:
        o = add("all_reduce_attn", "all_reduce", h, h, (o,))
    if arch.norms_per_layer == 4:
        o = add("post_attn_norm", "norm", h, h, (o,), norm_params)
    r = add("add_attn", "add", h, h, (o,))
    if arch.norms_per_layer == 1:
        m = x  # Falcon-7B: attention and MLP read the same LayerNorm output
    else:
        # parallel attention+MLP (GPT-NeoX, Falcon) normalises the layer input, not the residual
        m = add("norm_mlp", "norm", h, h, () if arch.parallel_attn_mlp else (r,), norm_params)
    ff = arch.intermediate_size
    outs: list[str] = []
    if arch.is_moe:
        e, mf = arch.moe_num_experts, arch.moe_intermediate_size
        ml = arch.moe_layers if arch.moe_dense_layers else 0  # 0: every layer
        xb_in, xb_out = (mf, h) if arch.moe_expert_bias else (0, 0)  # gpt-oss expert biases
        rt = add("router", "router", h, e, (m,), h * e + (e if arch.moe_router_bias else 0), ml)
        g = add("expert_gate_proj", "expert_gate_proj", h, mf, (m, rt), e * (h * mf + xb_in), ml)
        u = add("expert_up_proj", "expert_up_proj", h, mf, (m, rt), e * (h * mf + xb_in), ml)
        ac = add("expert_act", "expert_act", mf, mf, (g, u), None, ml)
        outs.append(add("expert_down_proj", "expert_down_proj", mf, h, (ac,), e * (mf * h + xb_out), ml))
        sf = arch.moe_shared_intermediate_size
        if sf:
            sg = add("shared_gate_proj", "gate_proj", h, sf, (m,), None, ml)
            su = add("shared_up_proj", "up_proj", h, sf, (m,), None, ml)
            sa = add("shared_act", "act", sf, sf, (sg, su), None, ml)
            sd = add("shared_down_proj", "down_proj", sf, h, (sa,), None, ml)
            if arch.moe_shared_gate:
                outs.append(add("shared_expert_gate", "router", h, 1, (m,), h, ml))
            outs.append(sd)
        if arch.moe_dense_layers:
            dl = arch.moe_dense_layers
            g = add("gate_proj", "gate_proj", h, ff, (m,), None, dl)
            u = add("up_proj", "up_proj", h, ff, (m,), None, dl)
            ac = add("act_mlp", "act", ff, ff, (g, u), None, dl)
            outs.append(add("down_proj", "down_proj", ff, h, (ac,), None, dl))
    elif arch.gated_mlp:
        b = ff if arch.mlp_bias else 0
        g = add("gate_proj", "gate_proj", h, ff, (m,), h * ff + b)
        u = add("up_proj", "up_proj", h, ff, (m,), h * ff + b)
        ac = add("act_mlp", "act", ff, ff, (g, u))
        outs.append(add("down_proj", "down_proj", ff, h, (ac,), ff * h + (h if arch.mlp_bias else 0)))
    else:
        u = add("up_proj", "up_proj", h, ff, (m,), h * ff + (ff if arch.mlp_bias else 0))
        ac = add("act_mlp", "act", ff, ff, (u,))
        outs.append(add("down_proj", "down_proj", ff, h, (ac,), ff * h + (h if arch.mlp_bias else 0)))
    last: Sequence[str] = outs
    if tensor_parallel > 1:
        last = (add("all_reduce_mlp", "all_reduce", h, h, tuple(outs)),)
    if arch.norms_per_layer == 4:
        last = (add("post_mlp_norm", "norm", h, h, tuple(last), norm_params),)
    add("add_mlp", "add", h, h, (*last, r))  # r: the residual stream from the attention block
    return nodes


def _node_cost(node: KernelNode, arch: ModelArch, prec: Precision, tp: int, seg: dict) -> tuple:
    """(ops, memory bytes, network bytes) of one node, per GPU, from the paper's equations.

    ``seg`` holds the segment quantities with batch folded in (batch=1 in every call below).
    """
    bt, bpairs, bkv, passes, xpasses = (seg[k] for k in SEGMENT_VARS)
    Dw, Da, Dkv = prec.weight_bytes, prec.activation_bytes, prec.kv_bytes
    h = arch.hidden_size
    k = node.kind
    zero = 0.0 * bt
    if k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router"):
        Dw = prec.linear_weight_bytes(k)
        # K/V projections write the KV cache; MLA's kv_a writes the latent cache, its kv_b expands
        # keys and values into activations (over every cached row per pass under HF eager).
        store = Dkv if k in ("k_proj", "v_proj") and not node.name.startswith("kv_b_proj") else Da
        rows = bkv if node.name == "kv_b_proj_ctx" else bt
        ops = K.linear_ops(1, rows, node.d_in, node.d_out, tp)
        mem = K.linear_memory_bytes(1, rows, passes, node.d_in, node.d_out, Dw, Da, store, tp)
        bias = node.weight_params - node.d_in * node.d_out
        mem = mem + bias * Dw * passes / tp
        return ops, mem, zero
    if k in ("expert_gate_proj", "expert_up_proj", "expert_down_proj"):
        Dw = prec.linear_weight_bytes(k)
        topk = arch.moe_experts_per_token
        ops = K.linear_ops(1, bt * topk, node.d_in, node.d_out, tp)
        bias_per_expert = node.weight_params / arch.moe_num_experts - node.d_in * node.d_out
        mem = (K.linear_weight_load_bytes(node.d_in, node.d_out, Dw, xpasses, tp)
               + bias_per_expert * Da * xpasses / tp  # gpt-oss expert biases stay in bf16
               + K.linear_activation_load_bytes(1, bt * topk, node.d_in, Da, tp)
               + K.linear_output_store_bytes(1, bt * topk, node.d_out, Da, tp))
        return ops, mem, zero
    qd, vd, heads = arch.head_dim, arch.value_head_dim, arch.num_heads
    sinks = node.weight_params * Da * passes / tp  # attention sinks: one bf16 value per head, read each pass
    if k == "attention":
        ops = (K.attention_matmul_ops(1, bpairs, qd, heads, tp) + K.attention_matmul_ops(1, bpairs, vd, heads, tp)
               + K.softmax_ops(1, bpairs, heads, tp))
        if arch.is_mla:
            kv = K.mla_latent_kv_load_bytes(1, bkv, arch.kv_cache_elements_per_token, Dkv, 1)
        else:
            kv = K.fused_attention_kv_load_bytes(1, bkv, qd, arch.num_kv_heads, Dkv, 1, tp)
        mem = (K.fused_attention_q_load_bytes(1, bt, qd, heads, Da, tp)
               + K.fused_attention_out_store_bytes(1, bt, vd, heads, Da, tp) + kv + sinks)
        return ops, mem, zero
    if k in ("matmul_qk", "matmul_sv"):
        d = qd if k == "matmul_qk" else vd
        ops = K.attention_matmul_ops(1, bpairs, d, heads, tp)
        fn = K.matmul_qk_memory_bytes if k == "matmul_qk" else K.matmul_sv_memory_bytes
        mem = fn(1, bt, bpairs, bkv, d, heads, arch.num_kv_heads, Da, Dkv, tp)
        return ops, mem, zero
    if k == "softmax":
        return (K.softmax_ops(1, bpairs, heads, tp),
                K.softmax_memory_bytes(1, bpairs, heads, Da, tp) + sinks, zero)
    if k == "norm":
        return (K.norm_ops(1, bt, node.d_in, tp),
                K.norm_memory_bytes(1, bt, node.d_in, Da, Dw, node.weight_params, passes, tp), zero)
    if k == "qk_norm":
        heads = arch.num_heads if node.name == "q_norm" else arch.num_kv_heads
        width = heads * arch.head_dim
        return (K.norm_ops(1, bt, width, tp),
                K.norm_memory_bytes(1, bt, width, Da, Dw, node.weight_params, passes, tp), zero)
    if k == "add":
        return K.add_ops(1, bt, h, tp), K.add_memory_bytes(1, bt, h, Da, tp), zero
    if k in ("act", "expert_act"):
        rows = bt * (arch.moe_experts_per_token if k == "expert_act" else 1)
        gated = arch.gated_mlp
        return K.act_ops(1, rows, node.d_in, tp), K.act_memory_bytes(1, rows, node.d_in, Da, gated, tp), zero
    if k == "all_reduce":
        return (K.allreduce_ops(1, bt, h, tp), K.allreduce_memory_bytes(1, bt, h, Da, tp),
                K.allreduce_network_bytes(1, bt, h, Da, tp))
    raise AssertionError(f"no cost model for kernel kind {k!r}")


def _flash_kv_rows(context_before, tokens, window=None, window_fraction=0.0, chunk=None, chunk_fraction=0.0):
    """Cached rows a causal flash prefill pass reads: each tile of FLASH_QUERY_TILE queries reads the
    keys up to its last query (within the window or its chunk, if any), once."""
    q = float(FLASH_QUERY_TILE)
    c = np.asarray(context_before, np.float64)
    t = np.asarray(tokens, np.float64)
    n = np.ceil(t / q)
    full = (n - 1) * c + q * (n - 1) * n / 2 + (c + t)  # sum over tiles of the last key each tile sees
    rows = full
    if window is not None:
        rows = (1 - window_fraction) * rows + window_fraction * np.minimum(full, n * (float(window) + q))
    if chunk is not None:  # a tile reads at most its chunk (plus the tile when it straddles two)
        rows = (1 - chunk_fraction) * rows + chunk_fraction * np.minimum(full, n * (float(chunk) + q))
    return rows


@dataclass(frozen=True)
class Segment:
    """A stretch of a request: ``tokens`` new tokens per sequence over ``passes`` forward passes."""

    batch: np.ndarray
    tokens: np.ndarray
    passes: np.ndarray
    context_before: np.ndarray

    @staticmethod
    def prefill(batch, prompt_len) -> "Segment":
        b, l = np.broadcast_arrays(np.asarray(batch, np.float64), np.asarray(prompt_len, np.float64))
        return Segment(b, l, np.ones_like(l), np.zeros_like(l))

    @staticmethod
    def decode(batch, prompt_len, gen_tokens) -> "Segment":
        """The N_gT - 1 decode steps after the prefill produced the first token."""
        b, l, n = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (batch, prompt_len, gen_tokens)))
        steps = np.maximum(n - 1.0, 0.0)
        return Segment(b, steps, steps, l)

    @staticmethod
    def chunk(batch, new_tokens, context_before) -> "Segment":
        """One engine step for a request: ``new_tokens`` (a prefill chunk or 1 decode token)."""
        b, t, c = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (batch, new_tokens, context_before)))
        return Segment(b, t, np.where(t > 0, 1.0, 0.0), c)


@dataclass(frozen=True)
class PhaseCosts:
    """Per-layer, per-GPU node costs for R requests: arrays of shape (R, n_nodes)."""

    ops: np.ndarray
    memory_bytes: np.ndarray
    network_bytes: np.ndarray
    performance_ops_per_s: np.ndarray
    time_s: np.ndarray


@dataclass(frozen=True)
class WorkloadTotals:
    """Whole-request totals over all layers, the LM head and all GPUs (arrays of shape (R,))."""

    prefill_flops: np.ndarray
    decode_flops: np.ndarray
    prefill_bytes: np.ndarray
    decode_bytes: np.ndarray
    prefill_network_bytes: np.ndarray
    decode_network_bytes: np.ndarray
    prefill_time_s: np.ndarray  # Roofline time, the sum of kernel times (no overlap, no launch cost)
    decode_time_s: np.ndarray
    prefill_matmul_flops: np.ndarray
    decode_matmul_flops: np.ndarray

    @property
    def network_bytes(self) -> np.ndarray:
        return self.prefill_network_bytes + self.decode_network_bytes


@dataclass(frozen=True)
class LayerTemplate:
    """Static part of the graph for one (model, GPU, precision, parallelism, attention kind)."""

    arch: ModelArch
    precision: Precision
    parallelism: Parallelism
    attention: str
    nodes: tuple[KernelNode, ...]
    edge_index: np.ndarray  # (2, E) int64, source -> destination
    kind_onehot: np.ndarray  # (n_nodes, len(KERNEL_KINDS))
    dims: np.ndarray  # (n_nodes, 2): d_in, d_out
    coef_ops: np.ndarray  # (5, n_nodes) per SEGMENT_VARS
    coef_mem: np.ndarray
    coef_net: np.ndarray
    peak_ops_per_s: float
    memory_bandwidth_bytes_per_s: float
    network_bandwidth_bytes_per_s: float
    head: dict = field(default_factory=dict)  # LM head / embedding coefficients

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    def _segment_vars(self, seg: Segment) -> np.ndarray:
        """(R, 5) matrix of the segment quantities."""
        arch = self.arch
        pairs = K.attention_pairs(seg.context_before, seg.tokens)
        if arch.sliding_window:
            f = arch.sliding_window_layer_fraction
            pairs = (1 - f) * pairs + f * K.attention_pairs(seg.context_before, seg.tokens, arch.sliding_window)
        if arch.attention_chunk:
            f = arch.attention_chunk_layer_fraction
            pairs = (1 - f) * pairs + f * K.attention_pairs(seg.context_before, seg.tokens, chunk=arch.attention_chunk)
        tokens_per_pass = np.where(seg.passes > 0, seg.tokens / np.maximum(seg.passes, 1.0), 0.0)
        multi_query = tokens_per_pass > 1  # a prefill (chunk); decode passes have one query each
        if self.attention == "unfused":
            # Matmul-softmax-matmul computes the whole (masked) score rectangle of a prefill pass and
            # reads each cached row once per pass.
            pairs = np.where(multi_query, seg.tokens * (seg.context_before + seg.tokens), pairs)
            kv_rows = np.where(multi_query, seg.context_before + seg.tokens, pairs)
        else:
            kv_rows = np.where(multi_query, _flash_kv_rows(seg.context_before, seg.tokens, arch.sliding_window,
                                                           arch.sliding_window_layer_fraction, arch.attention_chunk,
                                                           arch.attention_chunk_layer_fraction), pairs)
        if arch.is_moe:
            routed = seg.batch * tokens_per_pass
            xpasses = seg.passes * K.expected_unique_experts(arch.moe_num_experts, arch.moe_experts_per_token, routed)
        else:
            xpasses = np.zeros_like(seg.passes)
        return np.stack([seg.batch * seg.tokens, seg.batch * pairs, seg.batch * kv_rows, seg.passes, xpasses],
                        axis=-1)

    def costs(self, seg: Segment) -> PhaseCosts:
        v = np.atleast_2d(self._segment_vars(seg))
        ops, mem, net = v @ self.coef_ops, v @ self.coef_mem, v @ self.coef_net
        is_ar = self.kind_onehot[:, KIND_INDEX["all_reduce"]] > 0
        traffic = np.where(is_ar, net, mem)
        bw = np.where(is_ar, self.network_bandwidth_bytes_per_s, self.memory_bandwidth_bytes_per_s)
        perf = K.roofline_performance(ops, traffic, self.peak_ops_per_s, bw)
        return PhaseCosts(ops, mem, net, perf, K.roofline_time_s(ops, perf))

    def head_costs(self, seg: Segment):
        """LM head on the last token of each pass, final norm, embedding gather: all GPUs together."""
        a, p = self.arch, self.precision
        b = seg.batch
        ops = K.linear_ops(b, seg.passes, a.hidden_size, a.vocab_size, 1) + K.norm_ops(b, seg.passes, a.hidden_size, 1)
        mem = (K.linear_memory_bytes(b, seg.passes, seg.passes, a.hidden_size, a.vocab_size, p.activation_bytes,
                                     p.activation_bytes, p.activation_bytes, 1)
               # embedding rows gathered (never quantized), and position rows where the table is learned
               + b * seg.tokens * a.hidden_size * p.activation_bytes * (2 if a.position_embeddings else 1))
        t_compute = ops / self.peak_ops_per_s
        t_mem = mem / (self.memory_bandwidth_bytes_per_s * self.parallelism.tensor_parallel)
        matmul = K.linear_ops(b, seg.passes, a.hidden_size, a.vocab_size, 1)
        return ops, mem, np.maximum(t_compute / self.parallelism.tensor_parallel, t_mem), matmul

    def totals(self, prefill: Segment, decode: Segment, prefill_costs: PhaseCosts | None = None,
               decode_costs: PhaseCosts | None = None) -> WorkloadTotals:
        tp, pp = self.parallelism.tensor_parallel, self.parallelism.pipeline_parallel
        layers = self.arch.num_layers
        out = {}
        matmul_mask = np.array([n.kind in MATMUL_KINDS for n in self.nodes])
        for name, seg, c in (("prefill", prefill, prefill_costs), ("decode", decode, decode_costs)):
            c = c or self.costs(seg)
            h_ops, h_mem, h_time, h_mm = self.head_costs(seg)
            out[f"{name}_flops"] = c.ops.sum(-1) * tp * layers + h_ops
            out[f"{name}_matmul_flops"] = (c.ops * matmul_mask).sum(-1) * tp * layers + h_mm
            out[f"{name}_bytes"] = c.memory_bytes.sum(-1) * tp * layers + h_mem
            # Pipeline stages hand activations on: (pp - 1) transfers of |B| T h D_A.
            p2p = (pp - 1) * seg.batch * seg.tokens * self.arch.hidden_size * self.precision.activation_bytes
            out[f"{name}_network_bytes"] = c.network_bytes.sum(-1) * tp * layers + p2p
            out[f"{name}_time_s"] = c.time_s.sum(-1) * layers + h_time
        return WorkloadTotals(**out)

    def weight_bytes(self) -> float:
        """Bytes of all weights (what loading the model puts on the GPUs).

        Quantized checkpoints (AWQ, GPTQ, fp8) quantize the decoder's linear layers only; embeddings,
        the LM head, norms and biases stay in the activation dtype.
        """
        a, p = self.arch, self.precision
        linear = quantized = 0.0
        for n in self.nodes:
            if not n.weight_params or n.kind in _NON_MATRIX_KINDS:
                continue
            params = n.d_in * n.d_out * (a.moe_num_experts if n.kind.startswith("expert_") else 1) * (
                n.layers or a.num_layers)
            linear += params
            quantized += params * p.linear_weight_bytes(n.kind)
        return quantized + (a.param_count() - linear) * p.activation_bytes


@functools.lru_cache(maxsize=256)
def _build_template_cached(arch: ModelArch, precision: Precision, parallelism: Parallelism, attention: str,
                           peak: float, bw: float, net: float) -> LayerTemplate:
    tp = parallelism.tensor_parallel
    nodes = _layer_nodes(arch, attention=attention, tensor_parallel=tp)
    index = {n.name: i for i, n in enumerate(nodes)}
    edges = [(index[p], index[n.name]) for n in nodes for p in n.parents]
    edge_index = np.array(edges, dtype=np.int64).T.reshape(2, -1)
    onehot = np.zeros((len(nodes), len(KERNEL_KINDS)))
    for i, n in enumerate(nodes):
        onehot[i, KIND_INDEX[n.kind]] = 1.0
    coef = np.zeros((3, len(SEGMENT_VARS), len(nodes)))
    for j, var in enumerate(SEGMENT_VARS):
        unit = {v: (1.0 if v == var else 0.0) for v in SEGMENT_VARS}
        for i, n in enumerate(nodes):
            coef[:, j, i] = np.asarray(_node_cost(n, arch, precision, tp, unit)) * n.layer_share(arch.num_layers)
    return LayerTemplate(
        arch=arch, precision=precision, parallelism=parallelism, attention=attention, nodes=tuple(nodes),
        edge_index=edge_index, kind_onehot=onehot,
        dims=np.array([[n.d_in, n.d_out] for n in nodes], dtype=np.float64),
        coef_ops=coef[0], coef_mem=coef[1], coef_net=coef[2],
        peak_ops_per_s=peak, memory_bandwidth_bytes_per_s=bw, network_bandwidth_bytes_per_s=net,
    )


def build_layer_template(arch: ModelArch, precision: Precision, gpu, parallelism: Parallelism | None = None,
                         attention: str = "fused") -> LayerTemplate:
    """The cached static graph for one layer on ``gpu`` (a :class:`~llmco2_serve.hardware.gpus.GPUSpec`)."""
    parallelism = parallelism or Parallelism()
    compute = precision.compute_dtype
    if not gpu.supports(compute):
        # e.g. fp8 checkpoints on Ampere run weight-only (dequantised into the activation dtype)
        compute = precision.activation_dtype
    if compute == "bfloat16" and not gpu.supports(compute) and gpu.supports("float16"):
        compute = "float16"  # pre-Ampere GPUs (T4, V100) serve bf16 checkpoints in fp16, as vLLM does
    peak = float(gpu.peak_flops_per_s(compute))
    bw = float(gpu.memory_bandwidth_bytes_per_s())
    net = float(gpu.network_bandwidth_bytes_per_s() or 1.0)  # only all-reduce nodes (TP > 1) use it
    return _build_template_cached(arch, precision, parallelism, attention, peak, bw, net)


def direct_node_costs(template: LayerTemplate, seg: Segment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate every node's equations directly (no coefficients); used by tests to check ``costs``."""
    v = np.atleast_2d(template._segment_vars(seg))
    cols = [np.stack(_node_cost(n, template.arch, template.precision, template.parallelism.tensor_parallel,
                                dict(zip(SEGMENT_VARS, v.T)))) * n.layer_share(template.arch.num_layers)
            for n in template.nodes]
    arr = np.stack(cols, axis=-1)  # (3, R, n)
    return arr[0], arr[1], arr[2]

