"""Appendix A / section 4.1 kernel equations, one test per equation with hand-computed values.

Shared small integers (EcoLogits style): |B| = 2, d_in = 3, d_out = 5, L_seq = 7, N_gT = 4, N_GPU = 2,
so a decode segment has T = N_gT - 1 = 3 tokens over 3 passes; D = 2 bytes unless stated.
Attention: d_h = 4, n_h = 3, n_KV = 1. Where ``kernels`` corrects the paper (D1..D12) the test
asserts the physically right value and notes what the paper's formula gives.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llmco2_serve.workload import kernels as K

B, D_IN, D_OUT, L, N_GT, N_GPU = 2, 3, 5, 7, 4, 2
T_DEC = N_GT - 1  # decode tokens (and passes) per sequence
DH, NH, NKV = 4, 3, 1
# Decode context sum: the 3 decode queries after a 7-token prompt see 8 + 9 + 10 keys.
PAIRS_DEC = 8 + 9 + 10  # = 27
PAIRS_PRE_CAUSAL = 7 * 8 // 2  # = 28
PAIRS_PRE_SQUARE = 7 * 7  # = 49, what an unfused (masked) QK^T computes


# --------------------------------------------------------------------------------------------
# Attention context (D7)
# --------------------------------------------------------------------------------------------


def _brute_pairs(context_before: int, new_tokens: int, window: int | None) -> int:
    total = 0
    for pos in range(context_before + 1, context_before + new_tokens + 1):  # 1-based query position
        keys = 0
        for key in range(1, pos + 1):
            if window is None or pos - key < window:
                keys += 1
        total += keys
    return total


@pytest.mark.parametrize("window", [None, 1, 3, 5, 8])
def test_attention_pairs_closed_form_equals_brute_force(window):
    for c, t in itertools.product(range(0, 12), range(0, 9)):
        assert K.attention_pairs(c, t, window) == _brute_pairs(c, t, window), (c, t, window)


def test_causal_pairs_upto_hand_values():
    assert K.causal_pairs_upto(7) == 28
    # Window 3: 1 + 2 + 3 + 3 + 3 + 3 + 3
    assert K.causal_pairs_upto(7, 3) == 18
    assert K.causal_pairs_upto(2, 3) == 3  # below the window the window does not bite
    np.testing.assert_array_equal(K.causal_pairs_upto(np.array([0, 1, 4]), 2), [0, 1, 7])


def test_decode_pairs_eq21_d7_exact_sum_not_paper_form():
    """Eq. 21-24/30 use (2L + N_gT) N_gT / 2 = 36; the N_gT - 1 = 3 steps that run see 8+9+10 = 27 keys."""
    assert K.attention_pairs(L, T_DEC) == PAIRS_DEC == (N_GT - 1) * (2 * L + N_GT) / 2
    paper = (2 * L + N_GT) * N_GT / 2
    assert paper == 36 and PAIRS_DEC != paper


def test_attention_pairs_broadcasts_over_requests():
    got = K.attention_pairs(np.array([0, 7, 7]), np.array([7, 3, 0]), 4)
    np.testing.assert_array_equal(got, [_brute_pairs(0, 7, 4), _brute_pairs(7, 3, 4), 0])


# --------------------------------------------------------------------------------------------
# Linear kernels: Eq. 9-20
# --------------------------------------------------------------------------------------------


def test_eq9_linear_ops_decode():
    # 2 |B| d_in d_out (N_gT - 1) / N_GPU = 2*2*3*5*3/2
    assert K.linear_ops(B, T_DEC, D_IN, D_OUT, N_GPU) == 90


def test_eq15_linear_ops_prefill():
    # 2 |B| d_in d_out L / N_GPU = 2*2*3*5*7/2
    assert K.linear_ops(B, L, D_IN, D_OUT, N_GPU) == 210


def test_eq10_linear_weight_load_decode_rereads_every_step():
    # d_in d_out D_W (N_gT - 1) / N_GPU = 3*5*2*3/2
    assert K.linear_weight_load_bytes(D_IN, D_OUT, 2, T_DEC, N_GPU) == 45


def test_eq16_linear_weight_load_prefill_once():
    # d_in d_out D_W / N_GPU = 3*5*2/2; int4 weights (0.5 B) give a quarter of it
    assert K.linear_weight_load_bytes(D_IN, D_OUT, 2, 1, N_GPU) == 15
    assert K.linear_weight_load_bytes(D_IN, D_OUT, 0.5, 1, N_GPU) == 3.75


def test_eq11_linear_activation_load_decode():
    # d_in |B| D_A (N_gT - 1) / N_GPU = 3*2*2*3/2
    assert K.linear_activation_load_bytes(B, T_DEC, D_IN, 2, N_GPU) == 18


def test_eq17_linear_activation_load_prefill():
    assert K.linear_activation_load_bytes(B, L, D_IN, 2, N_GPU) == 42  # 3*2*2*7/2


def test_eq12_eq13_linear_output_store_decode_d1():
    """D1: K/V projections write the KV cache in D_KV, the others store activations in D_A.

    Appendix A says the opposite (K/V store activations, Eq. 12; the rest store "KV", Eq. 13); the
    function takes the element size, ``test_graph`` checks which one each projection gets.
    """
    # d_out |B| D (N_gT - 1) / N_GPU = 5*2*D*3/2
    assert K.linear_output_store_bytes(B, T_DEC, D_OUT, 2, N_GPU) == 30  # D_A = 2 (bf16)
    assert K.linear_output_store_bytes(B, T_DEC, D_OUT, 1, N_GPU) == 15  # D_KV = 1 (fp8 cache)


def test_eq18_eq19_linear_output_store_prefill():
    assert K.linear_output_store_bytes(B, L, D_OUT, 2, N_GPU) == 70  # 5*2*2*7/2


def test_eq14_linear_memory_decode():
    # Eq. 10 + 11 + 12: 45 + 18 + 30
    assert K.linear_memory_bytes(B, T_DEC, T_DEC, D_IN, D_OUT, 2, 2, 2, N_GPU) == 93


def test_eq20_linear_memory_prefill():
    # Eq. 16 + 17 + 18: 15 + 42 + 70
    assert K.linear_memory_bytes(B, L, 1, D_IN, D_OUT, 2, 2, 2, N_GPU) == 127


def test_linear_mixed_precision_bytes():
    # int4 weights (0.5), bf16 activations (2), fp8 KV store (1), prefill: 3.75 + 42 + 35
    assert K.linear_memory_bytes(B, L, 1, D_IN, D_OUT, 0.5, 2, 1, N_GPU) == 80.75


# --------------------------------------------------------------------------------------------
# Unfused attention: Eq. 21-26 (decode), Eq. 32-37 (prefill)
# --------------------------------------------------------------------------------------------


def test_eq21_matmul_ops_decode():
    # 2 |B| d_h n_h pairs / N_GPU = 2*2*4*3*27/2. Paper form (pairs 36): 864.
    assert K.attention_matmul_ops(B, PAIRS_DEC, DH, NH, N_GPU) == 648
    assert K.attention_matmul_ops(B, 36, DH, NH, N_GPU) == B * DH * NH * (2 * L + N_GT) * N_GT / N_GPU == 864


def test_eq32_matmul_ops_prefill_d5():
    """D5: Eq. 32 (2 |B| d_h n_h L / N_GPU = 168) lacks the factor L that Eq. 38 multiplies back in."""
    assert K.attention_matmul_ops(B, PAIRS_PRE_SQUARE, DH, NH, N_GPU) == 1176  # 2*2*4*3*49/2
    assert 2 * B * DH * NH * L / N_GPU * L == 1176


def test_eq22_softmax_ops_decode():
    # 5 |B| n_h pairs / N_GPU = 5*2*3*27/2. Paper (pairs 36): 540.
    assert K.softmax_ops(B, PAIRS_DEC, NH, N_GPU) == 405


def test_eq33_softmax_ops_prefill_d5():
    # 5 |B| n_h L^2 / N_GPU = 5*2*3*49/2; paper's Eq. 33 without the factor L: 105.
    assert K.softmax_ops(B, PAIRS_PRE_SQUARE, NH, N_GPU) == 735


def test_eq23_score_matrix_bytes_decode():
    # |B| n_h D_A pairs / N_GPU = 2*3*2*27/2
    assert K.score_matrix_bytes(B, PAIRS_DEC, NH, 2, N_GPU) == 162


def test_eq34_score_matrix_bytes_prefill():
    assert K.score_matrix_bytes(B, PAIRS_PRE_SQUARE, NH, 2, N_GPU) == 294  # 2*3*2*49/2


def test_eq24_kv_cache_read_decode():
    # |B| d_h n_KV D_KV pairs / N_GPU = 2*4*1*2*27/2; GQA reads n_KV heads, not n_h
    assert K.kv_cache_read_bytes(B, PAIRS_DEC, DH, NKV, 2, N_GPU) == 216


def test_eq35_kv_cache_read_prefill():
    # |B| d_h n_KV D_KV L / N_GPU = 2*4*1*2*7/2 (each cached row read once by the one GEMM)
    assert K.kv_cache_read_bytes(B, L, DH, NKV, 2, N_GPU) == 56


def test_eq25_matmul_memory_decode_d6():
    """Eq. 25 (Table 7 lists it for prefill and Eq. 36 for decode: swapped, D6).

    QK: Q in (|B| T d_h n_h D_A / N_GPU = 72) + K rows (216) + scores out (162).
    SV: scores in (162) + V rows (216) + output out (72).
    """
    args = (B, T_DEC, PAIRS_DEC, PAIRS_DEC, DH, NH, NKV, 2, 2, N_GPU)
    assert K.matmul_qk_memory_bytes(*args) == 72 + 216 + 162 == 450
    assert K.matmul_sv_memory_bytes(*args) == 162 + 216 + 72 == 450


def test_eq36_matmul_memory_prefill():
    # Q: 2*7*4*3*2/2 = 168; K rows read once: 56; scores: 294
    args = (B, L, PAIRS_PRE_SQUARE, L, DH, NH, NKV, 2, 2, N_GPU)
    assert K.matmul_qk_memory_bytes(*args) == 168 + 56 + 294
    assert K.matmul_sv_memory_bytes(*args) == 294 + 56 + 168


def test_matmul_memory_kv_dtype_is_separate():
    # fp8 KV cache (1 B) halves only the K read: 72 + 108 + 162
    assert K.matmul_qk_memory_bytes(B, T_DEC, PAIRS_DEC, PAIRS_DEC, DH, NH, NKV, 2, 1, N_GPU) == 342


def test_eq26_softmax_memory_decode():
    assert K.softmax_memory_bytes(B, PAIRS_DEC, NH, 2, N_GPU) == 324  # 2 x Eq. 23


def test_eq37_softmax_memory_prefill():
    assert K.softmax_memory_bytes(B, PAIRS_PRE_SQUARE, NH, 2, N_GPU) == 588  # 2 x 294


# --------------------------------------------------------------------------------------------
# Fused (flash) attention: Eq. 27-31 (decode), Eq. 38-42 (prefill)
# --------------------------------------------------------------------------------------------


def test_eq27_fused_ops_decode():
    # 2 O_matmul + O_softmax = 2*648 + 405
    assert K.fused_attention_ops(B, PAIRS_DEC, DH, NH, N_GPU) == 1701


def test_eq38_fused_ops_prefill_causal():
    """Eq. 38 = (2*168 + 105) * 7 = 3087 is the full L x L square; flash attention skips the masked
    half, so the causal pairs 28 give 2*672 + 420 = 1764 (and the square reproduces the paper)."""
    assert K.fused_attention_ops(B, PAIRS_PRE_CAUSAL, DH, NH, N_GPU) == 1764
    paper = (2 * (2 * B * DH * NH * L / N_GPU) + 5 * B * NH * L / N_GPU) * L
    assert K.fused_attention_ops(B, PAIRS_PRE_SQUARE, DH, NH, N_GPU) == paper == 3087


def test_eq28_fused_query_load_decode():
    # d_h |B| n_h D_A (N_gT - 1) / N_GPU = 4*2*3*2*3/2
    assert K.fused_attention_q_load_bytes(B, T_DEC, DH, NH, 2, N_GPU) == 72


def test_eq39_fused_query_load_prefill():
    assert K.fused_attention_q_load_bytes(B, L, DH, NH, 2, N_GPU) == 168


def test_eq29_fused_output_store_decode_d3():
    """D3: the output is one d_h-wide row per head and token (72); Eq. 29's factor 2 would give 144."""
    assert K.fused_attention_out_store_bytes(B, T_DEC, DH, NH, 2, N_GPU) == 72


def test_eq40_fused_output_store_prefill_d3():
    assert K.fused_attention_out_store_bytes(B, L, DH, NH, 2, N_GPU) == 168  # paper: 336


def test_eq30_fused_kv_load_decode_d4():
    """D4: K and V of every attended key read once per step (tile 1): 2 |B| d_h n_KV D_KV pairs / N_GPU.

    = 2*2*4*1*2*27/2 = 432. The paper's s_block factor (undefined for a given GPU) is dropped.
    """
    assert K.fused_attention_kv_load_bytes(B, PAIRS_DEC, DH, NKV, 2, 1, N_GPU) == 432


def test_eq41_fused_kv_load_prefill_tile_divides():
    # 2 |B| d_h n_KV D_KV pairs / tile / N_GPU with pairs 28, tile 7: 2*2*4*1*2*4/2
    assert K.fused_attention_kv_load_bytes(B, PAIRS_PRE_CAUSAL, DH, NKV, 2, 7, N_GPU) == 64


def test_eq31_fused_memory_decode_d2():
    """D2: queries in + output out + KV in = 72 + 72 + 432 = 576.

    Eq. 31 as printed adds the KV term twice and no output: 72 + 2*432 = 936.
    """
    got = K.fused_attention_memory_bytes(B, T_DEC, PAIRS_DEC, DH, NH, NKV, 2, 2, 1, N_GPU)
    assert got == 576


def test_eq42_fused_memory_prefill_d2():
    # 168 + 168 + 64 (tile 7)
    got = K.fused_attention_memory_bytes(B, L, PAIRS_PRE_CAUSAL, DH, NH, NKV, 2, 2, 7, N_GPU)
    assert got == 400


# --------------------------------------------------------------------------------------------
# Norm, residual add, MLP activation: Eq. 43-58 (size_h = 5, MLP width 6)
# --------------------------------------------------------------------------------------------

H, FF = 5, 6


def test_eq43_norm_ops_decode():
    assert K.norm_ops(B, T_DEC, H, N_GPU) == 105  # 7*2*5*3/2


def test_eq51_norm_ops_prefill():
    assert K.norm_ops(B, L, H, N_GPU) == 245  # 7*2*5*7/2


def test_eq44_add_ops_decode():
    assert K.add_ops(B, T_DEC, H, N_GPU) == 15  # 2*5*3/2


def test_eq52_add_ops_prefill():
    assert K.add_ops(B, L, H, N_GPU) == 35


def test_eq45_act_ops_decode_d8():
    """D8: 2 |B| width T / N_GPU over the MLP width 6 = 36; Eq. 45 with size_h = 5 would give 30."""
    assert K.act_ops(B, T_DEC, FF, N_GPU) == 36


def test_eq53_act_ops_prefill_d8():
    assert K.act_ops(B, L, FF, N_GPU) == 84  # 2*2*6*7/2 (paper, size_h: 70)


def test_eq46_eq49_norm_memory_decode_d9():
    """D9: activations in and out (Eq. 49: 2*2*5*2*3/2 = 60) plus the gain vector, 5 params x
    D_W 2 x 3 passes / 2 = 15, re-read every step: 75. The paper loads no norm weights (60)."""
    assert K.norm_memory_bytes(B, T_DEC, H, 2, 2, H, T_DEC, N_GPU) == 75
    assert K.norm_memory_bytes(B, T_DEC, H, 2, 2, 0, T_DEC, N_GPU) == 60  # no gain: the paper's value


def test_eq54_eq57_norm_memory_prefill_d9():
    # LayerNorm (gain + bias = 10 params), one pass: (2*2*5*2*7 + 10*2)/2 = 150
    assert K.norm_memory_bytes(B, L, H, 2, 2, 2 * H, 1, N_GPU) == 150


def test_eq49_add_memory_decode_d10():
    """D10: two inputs read and one output stored, 3*2*5*2*3/2 = 90 (Eq. 49's 2x gives 60)."""
    assert K.add_memory_bytes(B, T_DEC, H, 2, N_GPU) == 90


def test_eq57_add_memory_prefill_d10():
    assert K.add_memory_bytes(B, L, H, 2, N_GPU) == 210  # paper: 140


def test_eq47_eq48_eq50_act_memory_decode_d11():
    """D11: gated act reads gate and up (Eq. 47: 2*2*6*2*3/2 = 72) and stores one (Eq. 48: 36): 108.

    Eq. 50 as printed (3 x Eq. 47) would give 216; we use Eq. 58's load + store for both phases.
    """
    assert K.act_memory_bytes(B, T_DEC, FF, 2, True, N_GPU) == 108


def test_eq55_eq56_eq58_act_memory_prefill():
    assert K.act_memory_bytes(B, L, FF, 2, True, N_GPU) == 252  # 3*2*6*2*7/2
    # A non-gated MLP (Bloom GELU) reads one input: 2*2*6*2*7/2
    assert K.act_memory_bytes(B, L, FF, 2, False, N_GPU) == 168


# --------------------------------------------------------------------------------------------
# All-reduce: Eq. 2-7 (n = |B| T rows, m = size_h = 5, l = N_GPU)
# --------------------------------------------------------------------------------------------


def test_eq2_allreduce_ops_decode():
    # n (m / l) (N_gT - 1) with n = |B| = 2 rows per step: 2 * 5/2 * 3
    assert K.allreduce_ops(B, T_DEC, H, N_GPU) == 15


def test_eq3_allreduce_ops_prefill():
    assert K.allreduce_ops(B, L, H, N_GPU) == 35  # 2*7*5/2


def test_eq4_allreduce_memory_decode():
    assert K.allreduce_memory_bytes(B, T_DEC, H, 2, N_GPU) == 60  # 2 * 15 * 2


def test_eq5_allreduce_memory_prefill():
    assert K.allreduce_memory_bytes(B, L, H, 2, N_GPU) == 140


def test_eq6_allreduce_network_decode_d12():
    """D12: a ring all-reduce sends 2 (l-1)/l n m D_A per GPU = 2*(1/2)*2*3*5*2 = 60.

    Eq. 6 (n/l m (l-1) D_A (N_gT-1) = 30) counts the reduce-scatter half only.
    """
    assert K.allreduce_network_bytes(B, T_DEC, H, 2, N_GPU) == 60
    paper = (B / N_GPU) * H * (N_GPU - 1) * 2 * T_DEC
    assert paper == 30


def test_eq7_allreduce_network_prefill_d12():
    assert K.allreduce_network_bytes(B, L, H, 2, N_GPU) == 140  # 2*(1/2)*2*7*5*2
    assert K.allreduce_network_bytes(B, L, H, 2, 4) == 210  # l = 4: 2*(3/4)*140
    assert K.allreduce_network_bytes(B, L, H, 2, 1) == 0  # one GPU sends nothing


# --------------------------------------------------------------------------------------------
# Roofline: Eq. 8
# --------------------------------------------------------------------------------------------


def test_eq8_roofline_memory_bound():
    # MAI = 100/10 = 10 < MRP = 1000/50 = 20  ->  P = BW * MAI = 500
    assert K.roofline_performance(100, 10, 1000, 50) == 500


def test_eq8_roofline_compute_bound_and_at_ridge():
    assert K.roofline_performance(1000, 10, 1000, 50) == 1000  # MAI 100 > 20
    assert K.roofline_performance(200, 10, 1000, 50) == 1000  # MAI == MRP: "otherwise" branch


def test_eq8_roofline_allreduce_uses_network_bandwidth():
    """All-reduce: NAI = O / I = 15 / 60, NRP = Th / NET = 10 / 3 -> P = NET * NAI = 0.75."""
    assert K.roofline_performance(15, 60, 10, 3) == pytest.approx(0.75)
    # the same kernel against memory bandwidth 100 would be compute bound: different answer
    assert K.roofline_performance(15, 60, 10, 100) == 10


def test_eq8_roofline_no_traffic_is_compute_bound_and_vectorised():
    got = K.roofline_performance(np.array([100.0, 1000.0, 5.0]), np.array([10.0, 10.0, 0.0]), 1000, 50)
    np.testing.assert_array_equal(got, [500, 1000, 1000])


def test_roofline_time():
    np.testing.assert_array_equal(K.roofline_time_s(np.array([500.0, 0.0]), np.array([250.0, 0.0])), [2.0, 0.0])


# --------------------------------------------------------------------------------------------
# MoE: experts a pass must load
# --------------------------------------------------------------------------------------------


def _brute_unique_experts(e: int, k: int, tokens: int) -> float:
    choices = list(itertools.combinations(range(e), k))
    total = 0
    for picks in itertools.product(choices, repeat=tokens):
        total += len(set().union(*picks)) if picks else 0
    return total / len(choices) ** tokens


@pytest.mark.parametrize("e,k,t", [(4, 2, 1), (4, 2, 2), (4, 2, 3), (5, 1, 3), (3, 3, 2)])
def test_expected_unique_experts_matches_enumeration(e, k, t):
    assert K.expected_unique_experts(e, k, t) == pytest.approx(_brute_unique_experts(e, k, t))


def test_expected_unique_experts_limits():
    assert K.expected_unique_experts(8, 2, 0) == 0  # no tokens, no expert loaded
    assert K.expected_unique_experts(8, 2, 1) == pytest.approx(2)  # one token loads its top-k
    assert K.expected_unique_experts(4, 2, 2) == pytest.approx(3)  # 4 * (1 - (1/2)^2)
    assert K.expected_unique_experts(8, 2, 10_000) == pytest.approx(8)  # many tokens: all experts
    assert K.expected_unique_experts(8, 8, 1) == pytest.approx(8)  # k = E: every expert each token
    many = K.expected_unique_experts(60, 4, np.arange(0, 200))
    assert np.all(np.diff(many) > 0) and many[-1] <= 60
