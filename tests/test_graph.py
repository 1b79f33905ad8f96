"""Per-layer kernel graph: DAG structure per family, per-node costs by hand, coefficient form,
chunked schedules, tensor parallelism and weight bytes."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from llmco2_serve.workload import kernels as K
from llmco2_serve.workload.arch import ModelArch
from llmco2_serve.workload.graph import (
    KERNEL_KINDS,
    SEGMENT_VARS,
    Parallelism,
    Segment,
    build_layer_template,
    direct_node_costs,
    weight_params_per_layer,
)
from llmco2_serve.hardware.gpus import gpu_spec
from llmco2_serve.workload.precision import Precision
from llmco2_serve.devtools.tinymodel import FAMILIES, tiny_config

H100 = gpu_spec("H100")
BF16 = Precision.from_name("bfloat16")


def _tiny(family: str, **overrides) -> ModelArch:
    return ModelArch.from_hf_config(tiny_config(family, **overrides))


def _tpl(arch, *, tp=1, pp=1, attention="fused", prec=BF16, gpu=H100):
    return build_layer_template(arch, prec, gpu, Parallelism(tp, pp), attention=attention)


def _node_index(tpl) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(tpl.nodes)}


# A hand-sized Llama layer: h = 8, 2 query heads and 1 KV head of d_h = 4, MLP 12, vocab 16.
HAND = ModelArch.from_hf_config(dict(
    model_type="llama", hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, head_dim=4, vocab_size=16,
))
# int8 weights (D_W = 1), bf16 activations (D_A = 2), fp8 KV cache (D_KV = 1): every byte size differs
# from at least one other, so a kernel picking the wrong one shows.
HAND_PREC = Precision.from_name("int8", kv_cache_dtype="fp8")


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------


def _topological_order(n_nodes: int, edge_index: np.ndarray) -> list[int]:
    indeg = [0] * n_nodes
    children: list[list[int]] = [[] for _ in range(n_nodes)]
    for s, d in edge_index.T:
        children[s].append(d)
        indeg[d] += 1
    ready = [i for i in range(n_nodes) if indeg[i] == 0]
    order = []
    while ready:
        i = ready.pop()
        order.append(i)
        for c in children[i]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
    return order


@pytest.mark.parametrize("attention", ["fused", "unfused"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_dag_structure_per_family(family, tp, attention):
    arch = _tiny(family)
    tpl = _tpl(arch, tp=tp, attention=attention)
    names = [n.name for n in tpl.nodes]
    kinds = [n.kind for n in tpl.nodes]
    assert len(set(names)) == len(names)
    ei = tpl.edge_index
    assert ei.shape[0] == 2 and ei.dtype == np.int64
    assert ei.min() >= 0 and ei.max() < tpl.n_nodes
    assert not np.any(ei[0] == ei[1])
    # acyclic: a topological order covers every node
    order = _topological_order(tpl.n_nodes, ei)
    assert sorted(order) == list(range(tpl.n_nodes))
    # one entry (the attention norm) and one exit (the MLP residual add)
    sources = set(range(tpl.n_nodes)) - set(ei[1].tolist())
    sinks = set(range(tpl.n_nodes)) - set(ei[0].tolist())
    assert [names[i] for i in sources] == ["norm_attn"]
    assert [names[i] for i in sinks] == ["add_mlp"]
    # node features agree with the nodes
    assert tpl.kind_onehot.shape == (tpl.n_nodes, len(KERNEL_KINDS))
    np.testing.assert_array_equal(tpl.kind_onehot.sum(1), 1.0)
    assert [KERNEL_KINDS[j] for j in tpl.kind_onehot.argmax(1)] == kinds
    np.testing.assert_array_equal(tpl.dims, [[n.d_in, n.d_out] for n in tpl.nodes])

    assert {"q_proj", "k_proj", "v_proj", "o_proj", "add"} <= set(kinds)
    if attention == "fused":
        assert kinds.count("attention") == 1
        assert not {"matmul_qk", "softmax", "matmul_sv"} & set(kinds)
    else:
        assert "attention" not in kinds
        assert [k for k in kinds if k in ("matmul_qk", "softmax", "matmul_sv")] == ["matmul_qk", "softmax", "matmul_sv"]
        i = _node_index(tpl)
        parents = {tuple(int(s) for s in ei[0][ei[1] == i[name]]) for name in ("softmax",)}
        assert parents == {(i["matmul_qk"],)}
    assert kinds.count("all_reduce") == (2 if tp > 1 else 0)
    assert kinds.count("qk_norm") == (2 if family == "qwen3" else 0)
    assert kinds.count("norm") == (4 if family == "gemma2" else 2)
    moe_kinds = {"router", "expert_gate_proj", "expert_up_proj", "expert_act", "expert_down_proj"}
    if family in ("mixtral", "qwen2_moe"):
        assert moe_kinds <= set(kinds)
        assert "gate_proj" in kinds if family == "qwen2_moe" else "gate_proj" not in kinds
    else:
        assert not moe_kinds & set(kinds)
    if family == "bloom":
        assert "gate_proj" not in kinds and {"up_proj", "act", "down_proj"} <= set(kinds)


def test_qwen2_moe_shared_expert_nodes():
    tpl = _tpl(_tiny("qwen2_moe"))
    names = [n.name for n in tpl.nodes]
    assert {"shared_gate_proj", "shared_up_proj", "shared_act", "shared_down_proj", "shared_expert_gate"} <= set(names)
    i = _node_index(tpl)
    assert tpl.nodes[i["shared_gate_proj"]].d_out == 256 and tpl.nodes[i["expert_gate_proj"]].d_out == 128


def test_qk_norm_sits_between_projection_and_attention():
    tpl = _tpl(_tiny("qwen3"))
    i = _node_index(tpl)
    edges = set(map(tuple, tpl.edge_index.T.tolist()))
    assert (i["q_proj"], i["q_norm"]) in edges and (i["k_proj"], i["k_norm"]) in edges
    assert {(i["q_norm"], i["attention"]), (i["k_norm"], i["attention"]), (i["v_proj"], i["attention"])} <= edges
    assert (i["q_proj"], i["attention"]) not in edges


def test_allreduce_follows_row_parallel_projections():
    tpl = _tpl(_tiny("llama"), tp=2)
    i = _node_index(tpl)
    edges = set(map(tuple, tpl.edge_index.T.tolist()))
    assert (i["o_proj"], i["all_reduce_attn"]) in edges and (i["all_reduce_attn"], i["add_attn"]) in edges
    assert (i["down_proj"], i["all_reduce_mlp"]) in edges and (i["all_reduce_mlp"], i["add_mlp"]) in edges


def test_residual_stream_edge():
    tpl = _tpl(_tiny("llama"))
    i = _node_index(tpl)
    assert (i["add_attn"], i["add_mlp"]) in set(map(tuple, tpl.edge_index.T.tolist()))


def test_bad_parallelism_and_attention_rejected():
    with pytest.raises(ValueError, match="tensor_parallel"):
        Parallelism(0)
    with pytest.raises(ValueError, match="pipeline_parallel"):
        Parallelism(1, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attention"):
        _tpl(_tiny("llama"), attention="flash")


# --------------------------------------------------------------------------------------------
# Per-node costs by hand (|B| = 2, L = 3, N_gT = 4)
# --------------------------------------------------------------------------------------------

# prefill: bt = 6 token rows, 6 causal pairs per sequence, one pass, flash tile = 3 queries
HAND_PREFILL = {
    # name: (ops, memory bytes)
    "norm_attn": (7 * 6 * 8, 2 * 6 * 8 * 2 + 8 * 1),  # Eq. 51; Eq. 57 + gain in D_W (D9)
    "q_proj": (2 * 6 * 8 * 8, 64 * 1 + 6 * 8 * 2 + 6 * 8 * 2),  # Eq. 15; Eq. 16+17+18
    "k_proj": (2 * 6 * 8 * 4, 32 * 1 + 6 * 8 * 2 + 6 * 4 * 1),  # output into the fp8 KV cache (D1)
    "v_proj": (2 * 6 * 8 * 4, 32 * 1 + 6 * 8 * 2 + 6 * 4 * 1),
    # Eq. 38 with causal pairs: 2 * (2*12*4*2) + 5*12*2; memory: Q 96 + out 96 + KV 2*(12/3)*4*1
    "attention": (2 * 2 * 12 * 4 * 2 + 5 * 12 * 2, 96 + 96 + 2 * 6 * 4 * 1),  # one tile reads all 3 rows
    "o_proj": (2 * 6 * 8 * 8, 64 + 96 + 96),
    "add_attn": (6 * 8, 3 * 6 * 8 * 2),  # Eq. 52; D10
    "norm_mlp": (7 * 6 * 8, 2 * 6 * 8 * 2 + 8),
    "gate_proj": (2 * 6 * 8 * 12, 96 + 96 + 6 * 12 * 2),
    "up_proj": (2 * 6 * 8 * 12, 96 + 96 + 6 * 12 * 2),
    "act_mlp": (2 * 6 * 12, 3 * 6 * 12 * 2),  # Eq. 53 over the MLP width (D8); Eq. 58 gated (D11)
    "down_proj": (2 * 6 * 12 * 8, 96 + 6 * 12 * 2 + 96),
    "add_mlp": (6 * 8, 3 * 6 * 8 * 2),
}
# decode: 3 steps, bt = 6, pairs 4+5+6 = 15 per sequence, 3 passes re-read the weights
HAND_DECODE = {
    "norm_attn": (336, 192 + 8 * 3),
    "q_proj": (768, 64 * 3 + 96 + 96),  # Eq. 9; Eq. 10 re-reads the weights every step
    "k_proj": (384, 32 * 3 + 96 + 24),
    "v_proj": (384, 32 * 3 + 96 + 24),
    "attention": (2 * 2 * 30 * 4 * 2 + 5 * 30 * 2, 96 + 96 + 2 * 30 * 4 * 1),  # Eq. 27; Eq. 31 (D2), tile 1
    "o_proj": (768, 192 + 96 + 96),
    "add_attn": (48, 288),
    "norm_mlp": (336, 216),
    "gate_proj": (1152, 96 * 3 + 96 + 144),
    "up_proj": (1152, 96 * 3 + 96 + 144),
    "act_mlp": (144, 432),
    "down_proj": (1152, 96 * 3 + 144 + 96),
    "add_mlp": (48, 288),
}


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_hand_computed_node_costs(phase):
    tpl = _tpl(HAND, prec=HAND_PREC)
    seg = Segment.prefill(2, 3) if phase == "prefill" else Segment.decode(2, 3, 4)
    expected = HAND_PREFILL if phase == "prefill" else HAND_DECODE
    c = tpl.costs(seg)
    got = {n.name: (c.ops[0, j], c.memory_bytes[0, j]) for j, n in enumerate(tpl.nodes)}
    assert got == expected
    np.testing.assert_array_equal(c.network_bytes, 0.0)


def test_hand_computed_tp2_halves_per_gpu_costs_and_adds_allreduce():
    tpl = _tpl(HAND, prec=HAND_PREC, tp=2)
    c = tpl.costs(Segment.prefill(2, 3))
    i = _node_index(tpl)
    for name, (ops, mem) in HAND_PREFILL.items():
        assert c.ops[0, i[name]] == ops / 2
        assert c.memory_bytes[0, i[name]] == mem / 2
    for name in ("all_reduce_attn", "all_reduce_mlp"):
        j = i[name]
        assert c.ops[0, j] == 6 * 8 / 2  # Eq. 3: n m / l
        assert c.memory_bytes[0, j] == 2 * 24 * 2  # Eq. 5
        assert c.network_bytes[0, j] == 2 * (1 / 2) * 6 * 8 * 2  # Eq. 7 as a ring (D12)
        # Eq. 8 against the network: NAI = 24/96 < NRP, so P = NET * NAI = 900 GB/s * 0.25
        assert c.performance_ops_per_s[0, j] == pytest.approx(900e9 * 0.25)
        assert c.time_s[0, j] == pytest.approx(24 / (900e9 * 0.25))
    # a projection is memory bound against HBM: P = 3.35 TB/s * 384/128
    assert c.performance_ops_per_s[0, i["q_proj"]] == pytest.approx(3350e9 * 3)


def test_hand_computed_totals_include_lm_head():
    tpl = _tpl(HAND, prec=HAND_PREC)
    tot = tpl.totals(Segment.prefill(2, 3), Segment.decode(2, 3, 4))
    layer_ops = sum(o for o, _ in HAND_PREFILL.values())
    assert layer_ops == 7176
    # LM head on the last token of the one pass (2 * |B| * h * V) plus the final norm (7 |B| h)
    assert tot.prefill_flops[0] == 7176 + 2 * 2 * 8 * 16 + 7 * 2 * 8
    matmul = sum(HAND_PREFILL[n][0] for n in ("q_proj", "k_proj", "v_proj", "attention", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"))
    assert tot.prefill_matmul_flops[0] == matmul + 2 * 2 * 8 * 16
    # decode: the head runs once per step for each sequence
    assert tot.decode_flops[0] == sum(o for o, _ in HAND_DECODE.values()) + 3 * (2 * 2 * 8 * 16 + 7 * 2 * 8)
    assert tot.prefill_network_bytes[0] == tot.decode_network_bytes[0] == 0


def test_moe_expert_nodes_by_hand():
    """E = 4 experts, top-2, MLP width 6; decode |B| = 2 for 3 steps: each step's 2 tokens hit
    4 (1 - (1/2)^2) = 3 experts in expectation, so 9 expert weight loads over the segment."""
    arch = ModelArch.from_hf_config(dict(
        model_type="mixtral", hidden_size=8, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, vocab_size=16, num_local_experts=4, num_experts_per_tok=2,
    ))
    tpl = _tpl(arch)
    c = tpl.costs(Segment.decode(2, 3, 4))
    i = _node_index(tpl)
    # 6 token rows each routed to 2 experts: 2 * 12 * 8 * 6; weights 8*6*2 B x 9; in 12*8*2; out 12*6*2
    assert c.ops[0, i["expert_gate_proj"]] == 1152
    assert c.memory_bytes[0, i["expert_gate_proj"]] == pytest.approx(96 * 9 + 192 + 144)
    assert c.ops[0, i["router"]] == 2 * 6 * 8 * 4
    assert c.ops[0, i["expert_act"]] == 2 * 12 * 6
    assert c.ops[0, i["expert_down_proj"]] == 1152


# --------------------------------------------------------------------------------------------
# Coefficient form == direct evaluation
# --------------------------------------------------------------------------------------------


def _random_segments(rng, n=40):
    batch = rng.integers(1, 9, n)
    tokens = rng.integers(0, 400, n)
    context = rng.integers(0, 3000, n)
    kind = rng.integers(0, 3, n)
    passes = np.where(kind == 0, 1, np.where(kind == 1, tokens, rng.integers(1, 5, n)))
    passes = np.where(tokens == 0, 0, passes)
    return Segment(batch.astype(float), tokens.astype(float), passes.astype(float), context.astype(float))


@pytest.mark.parametrize("attention", ["fused", "unfused"])
@pytest.mark.parametrize("family,overrides", [
    ("llama", {}), ("mixtral", {}), ("qwen2_moe", {}), ("qwen3", {}), ("gemma2", {"sliding_window": 64}),
    ("bloom", {}), ("mistral", {"sliding_window": 100}),
])
def test_coefficient_costs_equal_direct_node_costs(family, overrides, attention):
    rng = np.random.default_rng(zlib.crc32(f"{family}/{attention}".encode()))  # stable across runs
    for tp in (1, 2):
        tpl = _tpl(_tiny(family, **overrides), tp=tp, attention=attention, prec=Precision.from_name("fp8"))
        seg = _random_segments(rng)
        c = tpl.costs(seg)
        ops, mem, net = direct_node_costs(tpl, seg)
        np.testing.assert_allclose(c.ops, ops, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(c.memory_bytes, mem, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(c.network_bytes, net, rtol=1e-12, atol=1e-9)
        assert c.ops.shape == (40, tpl.n_nodes)
        assert np.all(np.isfinite(c.time_s)) and np.all(c.time_s >= 0)


# --------------------------------------------------------------------------------------------
# Chunked schedules vs one-shot phases
# --------------------------------------------------------------------------------------------

LINEAR_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "router"}


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "gemma2", "bloom"])
def test_decode_step_by_step_equals_decode_segment(family):
    """Decode one engine step at a time (what the serving hook sees) == the paper's decode phase."""
    for attention in ("fused", "unfused"):
        tpl = _tpl(_tiny(family), attention=attention)
        b, L, n = 3, 40, 9
        one = tpl.costs(Segment.decode(b, L, n))
        steps = [tpl.costs(Segment.chunk(b, 1, L + s)) for s in range(n - 1)]
        np.testing.assert_allclose(sum(s.ops for s in steps), one.ops, rtol=1e-12)
        np.testing.assert_allclose(sum(s.memory_bytes for s in steps), one.memory_bytes, rtol=1e-12)


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen3", "gemma2", "bloom", "phi3"])
def test_chunked_prefill_linear_kernels_equal_one_shot(family):
    """Chunks 5+4+3 of a 12-token prompt: the same token rows, so linear (and norm/add/act) ops and
    activation bytes are those of one 12-token prefill; weights are re-read once per extra chunk.
    Fused attention sees the same causal pairs (they telescope)."""
    tpl = _tpl(_tiny(family))
    b = 2
    one = tpl.costs(Segment.prefill(b, 12))
    chunks = [tpl.costs(Segment.chunk(b, t, c)) for t, c in ((5, 0), (4, 5), (3, 9))]
    ops = sum(c.ops for c in chunks)
    mem = sum(c.memory_bytes for c in chunks)
    np.testing.assert_allclose(ops, one.ops, rtol=1e-12)  # includes fused attention (causal pairs)
    w_per_pass = tpl.coef_mem[SEGMENT_VARS.index("passes")]
    for j, node in enumerate(tpl.nodes):
        if node.kind in LINEAR_KINDS | {"norm", "add", "act"}:
            assert mem[0, j] == pytest.approx(one.memory_bytes[0, j] + 2 * w_per_pass[j]), node.name


def test_unfused_chunked_prefill_computes_less_than_the_square():
    # masked square per chunk: 5*5 + 4*9 + 3*12 = 97 pairs vs 12*12 = 144 in one shot
    tpl = _tpl(_tiny("llama"), attention="unfused")
    i = _node_index(tpl)["matmul_qk"]
    one = tpl.costs(Segment.prefill(1, 12)).ops[0, i]
    chunked = sum(tpl.costs(Segment.chunk(1, t, c)).ops[0, i] for t, c in ((5, 0), (4, 5), (3, 9)))
    assert one == K.attention_matmul_ops(1, 144, 32, 4, 1)
    assert chunked == K.attention_matmul_ops(1, 97, 32, 4, 1)


def test_whole_request_totals_chunked_equal_one_shot_for_linear_flops():
    tpl = _tpl(_tiny("llama"))
    one = tpl.totals(Segment.prefill(2, 12), Segment.decode(2, 12, 5))
    # the schedule as one request: the whole prompt in one step, then 4 single-token steps
    steps = [Segment.chunk(2, 12, 0)] + [Segment.chunk(2, 1, 12 + s) for s in range(4)]
    flops = sum(tpl.totals(s, Segment.decode(2, 0, 0)).prefill_flops for s in steps)
    assert flops == pytest.approx(one.prefill_flops + one.decode_flops, rel=1e-12)


def test_decode_of_one_generated_token_is_empty():
    tpl = _tpl(_tiny("llama"))
    tot = tpl.totals(Segment.prefill(2, 12), Segment.decode(2, 12, 1))
    assert tot.decode_flops[0] == tot.decode_bytes[0] == tot.decode_time_s[0] == 0


# --------------------------------------------------------------------------------------------
# Tensor and pipeline parallelism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tp_divides_per_gpu_work_and_keeps_request_totals(family):
    arch = _tiny(family)
    pre, dec = Segment.prefill(np.array([1, 4]), np.array([17, 300])), Segment.decode(np.array([1, 4]), np.array([17, 300]), 6)
    t1, t2 = _tpl(arch, tp=1), _tpl(arch, tp=2)
    c1, c2 = t1.costs(pre), t2.costs(pre)
    i1, i2 = _node_index(t1), _node_index(t2)
    for name, j in i1.items():
        np.testing.assert_allclose(c2.ops[:, i2[name]], c1.ops[:, j] / 2, rtol=1e-12)
    tot1, tot2 = t1.totals(pre, dec), t2.totals(pre, dec)
    np.testing.assert_allclose(tot2.prefill_matmul_flops, tot1.prefill_matmul_flops, rtol=1e-12)
    np.testing.assert_allclose(tot2.decode_matmul_flops, tot1.decode_matmul_flops, rtol=1e-12)
    # total flops grow by exactly the all-reduce additions: 2 per layer, |B| T h / 2 per GPU x 2 GPUs
    layers, h = arch.num_layers, arch.hidden_size
    for seg, f1, f2 in ((pre, tot1.prefill_flops, tot2.prefill_flops), (dec, tot1.decode_flops, tot2.decode_flops)):
        np.testing.assert_allclose(f2 - f1, 2 * layers * seg.batch * seg.tokens * h, rtol=1e-12)
    # network bytes only with TP > 1: per all-reduce each GPU sends 2 (l-1)/l |B| T h D_A
    np.testing.assert_array_equal(tot1.network_bytes, 0.0)
    expected = 2 * layers * 2 * (2 * 0.5 * (pre.batch * pre.tokens + dec.batch * dec.tokens) * h * 2)
    np.testing.assert_allclose(tot2.network_bytes, expected, rtol=1e-12)
    assert np.all(tot2.network_bytes > 0)


def test_pipeline_parallel_hands_activations_on():
    arch = _tiny("llama")
    tpl = _tpl(arch, pp=2)
    tot = tpl.totals(Segment.prefill(2, 10), Segment.decode(2, 10, 4))
    assert tot.prefill_network_bytes[0] == 1 * 2 * 10 * 128 * 2
    assert tot.decode_network_bytes[0] == 1 * 2 * 3 * 128 * 2
    base = _tpl(arch).totals(Segment.prefill(2, 10), Segment.decode(2, 10, 4))
    assert tot.prefill_flops[0] == base.prefill_flops[0]


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2), ("float16", 2)])
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_bytes_is_param_count_times_dtype_size(family, dtype, size):
    arch = _tiny(family)
    tpl = _tpl(arch, prec=Precision.from_name(dtype))
    assert tpl.weight_bytes() == arch.param_count() * size


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2])
def test_weights_read_per_pass_are_the_layer_parameters(family, tp):
    """Per pass a dense layer reads all its parameters once; an MoE layer reads the non-expert ones
    per pass and each loaded expert's gate/up/down per expert (the ``xpasses`` coefficient)."""
    arch = _tiny(family)
    tpl = _tpl(arch, tp=tp)
    per_pass = tpl.coef_mem[SEGMENT_VARS.index("passes")].sum() * tp
    per_expert = tpl.coef_mem[SEGMENT_VARS.index("xpasses")].sum() * tp
    if arch.is_moe:
        assert per_expert == 3 * arch.hidden_size * arch.moe_intermediate_size * 2
    else:
        assert per_expert == 0
    assert per_pass + per_expert * arch.moe_num_experts == weight_params_per_layer(arch) * 2


def test_weight_only_quantization_keeps_embeddings_in_activation_dtype():
    arch = ModelArch.from_hf_config(dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ))
    tpl = _tpl(arch, prec=Precision.from_name("int4", base_dtype="bfloat16"))
    assert tpl.weight_bytes() == pytest.approx(6_979_321_856 * 0.5 + 1_050_939_392 * 2, rel=0.03)


# --------------------------------------------------------------------------------------------
# Known physics gaps (strict xfails: they pass once fixed)
# --------------------------------------------------------------------------------------------


def test_unfused_decode_step_respects_sliding_window():
    tpl = _tpl(_tiny("mistral", sliding_window=8), attention="unfused")
    i = _node_index(tpl)["matmul_qk"]
    heads, dh = 4, 32
    for seg in (Segment.decode(1, 24, 2), Segment.chunk(1, 1, 24)):
        assert tpl.costs(seg).ops[0, i] == 2 * dh * heads * 8  # one query sees the last 8 keys


def test_fused_prefill_reads_each_cached_row_once_per_tile():
    arch = _tiny("llama")
    tpl = _tpl(arch)
    i = _node_index(tpl)["attention"]
    got = tpl.costs(Segment.prefill(1, 7)).memory_bytes[0, i]
    q_and_out = 2 * 7 * arch.q_size * 2
    assert got == q_and_out + 2 * 7 * arch.kv_size * 2


# --------------------------------------------------------------------------------------------
# Families of the vLLM benchmark data (issue 7): chunked attention, MLA, mixed dense/MoE layers
# --------------------------------------------------------------------------------------------

_BASE = {"vocab_size": 512, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
NEW_FAMILIES = {
    "gemma3_text": {"model_type": "gemma3_text", **_BASE, "intermediate_size": 256, "num_hidden_layers": 6,
                    "sliding_window": 64},
    "gpt_oss": {"model_type": "gpt_oss", **_BASE, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 64},
    "llama4_text": {"model_type": "llama4_text", **_BASE, "intermediate_size": 64, "intermediate_size_mlp": 256,
                    "num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 1,
                    "interleave_moe_layer_step": 2, "attention_chunk_size": 96},
    "deepseek_v3": {"model_type": "deepseek_v3", **_BASE, "num_key_value_heads": 4, "intermediate_size": 256,
                    "moe_intermediate_size": 64, "num_hidden_layers": 3, "n_routed_experts": 8,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": 64,
                    "head_dim": 16, "n_group": 1, "topk_group": 1, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32},
}


def _new(name, **changes) -> ModelArch:
    return ModelArch.from_hf_config(dict(NEW_FAMILIES[name], **changes))


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_pairs_equal_enumeration(chunk):
    """Llama 4's chunk mask: query p (0-based) sees keys k <= p with k // C == p // C."""
    for context in (0, 3, 16, 37):
        for new in (1, 7, 40):
            brute = sum(1 for p in range(context, context + new) for k in range(p + 1) if k // chunk == p // chunk)
            assert K.attention_pairs(context, new, chunk=chunk) == brute


@pytest.mark.parametrize("attention", ["fused", "unfused"])
@pytest.mark.parametrize("name", sorted(NEW_FAMILIES))
def test_new_family_coefficients_equal_direct_costs(name, attention):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{attention}".encode()))
    for tp in (1, 2):
        tpl = _tpl(_new(name), tp=tp, attention=attention, prec=Precision.from_name("fp8"))
        seg = _random_segments(rng)
        c = tpl.costs(seg)
        ops, mem, net = direct_node_costs(tpl, seg)
        np.testing.assert_allclose(c.ops, ops, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(c.memory_bytes, mem, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(c.network_bytes, net, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("name", sorted(NEW_FAMILIES))
@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2)])
def test_new_family_weight_bytes_is_param_count_times_dtype_size(name, dtype, size):
    arch = _new(name)
    assert _tpl(arch, prec=Precision.from_name(dtype)).weight_bytes() == arch.param_count() * size


def test_chunked_decode_step_sees_only_its_chunk():
    arch = _new("llama4_text")  # chunk 96 on 3 of 4 layers (layer 4 is NoPE: full attention)
    tpl = _tpl(arch, attention="unfused")
    i = _node_index(tpl)["matmul_qk"]
    for context, own_chunk in ((10, 11), (95, 96), (96, 1), (200, 9)):
        keys = 0.75 * own_chunk + 0.25 * (context + 1)
        assert tpl.costs(Segment.chunk(1, 1, context)).ops[0, i] == pytest.approx(2 * 32 * 4 * keys)


def test_mixed_dense_and_moe_layers_cost_what_their_layers_cost_apart():
    """1 dense + 2 MoE layers (DeepSeek's first_k_dense_replace) cost what a 1-layer dense model and
    a 2-layer MoE model of the same sizes cost together (each of those counts the LM head once)."""
    mixed = _new("deepseek_v3")
    dense = _new("deepseek_v3", num_hidden_layers=1, first_k_dense_replace=1)
    moe = _new("deepseek_v3", num_hidden_layers=2, first_k_dense_replace=0)
    assert not dense.is_moe and moe.moe_dense_layers == 0 and mixed.moe_dense_layers == 1
    assert mixed.param_count() + mixed.vocab_size * 128 * 2 + 128 == dense.param_count() + moe.param_count()
    pre, dec = Segment.prefill(3, 50), Segment.decode(3, 50, 20)
    for attention in ("fused", "unfused"):
        t_mixed, t_dense, t_moe = (_tpl(a, attention=attention) for a in (mixed, dense, moe))
        tm, td, te = (t.totals(pre, dec) for t in (t_mixed, t_dense, t_moe))
        for phase, seg in (("prefill", pre), ("decode", dec)):
            head_ops, head_bytes = (float(np.ravel(x)[0]) for x in t_mixed.head_costs(seg)[:2])
            for field, head in (("flops", head_ops), ("bytes", head_bytes)):
                got = float(getattr(tm, f"{phase}_{field}")[0]) + head
                want = float(getattr(td, f"{phase}_{field}")[0]) + float(getattr(te, f"{phase}_{field}")[0])
                assert got == pytest.approx(want, rel=1e-12), (attention, phase, field)


def test_mla_kv_cache_bytes_per_token_are_the_latent_not_the_heads():
    """A decode step reads, per cached token and layer, what HF's DeepSeek-V3 cache holds per token
    and layer (the compressed latent + the rope key), once for all heads, on every TP rank."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = dict(NEW_FAMILIES["deepseek_v3"])
    hf_cfg = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    layer = out.past_key_values.layers[0]
    per_token = layer.keys.shape[-1] * layer.keys.shape[1] + layer.values.shape[-1] * layer.values.shape[1]
    arch = _new("deepseek_v3")
    assert arch.kv_cache_elements_per_token == per_token == 32 + 16
    for tp in (1, 2):
        tpl = _tpl(arch, tp=tp, prec=Precision.from_name("bfloat16"))
        i = _node_index(tpl)["attention"]
        a = tpl.costs(Segment.chunk(1, 1, 1000)).memory_bytes[0, i]
        b = tpl.costs(Segment.chunk(1, 1, 2000)).memory_bytes[0, i]
        assert b - a == pytest.approx(1000 * per_token * 2)  # per GPU: the latent is not split by TP
