"""Kernel cost equations of the LLMCO2 paper (section 4.1 and Appendix A), one function each.

Every function returns a per-GPU quantity (the paper divides by N_GPU throughout) and works on
Python numbers and NumPy arrays alike (broadcasting), so a server can evaluate many requests at
once. Units: operations (``_ops``), bytes (``_bytes``), FLOP/s and bytes/s for Roofline.

The paper writes prefill and decode separately (L_seq tokens once; N_gT - 1 decode steps). We write
each kernel once over a *segment* of a request and derive both phases from it:

* ``tokens``  tokens processed per sequence in the segment (prefill: L_seq; decode: N_gT - 1),
* ``passes``  forward passes in the segment, each re-reading the weights (prefill: 1; decode: N_gT - 1),
* ``pairs``   attended (query, key) pairs per sequence and head (see :func:`attention_pairs`).

This is what makes the same equations usable for one chunked-prefill chunk or one decode step in a
serving engine. Where Appendix A is physically wrong we implement the physics and list the
deviation in ``docs/appendix-a-deviations.md`` (labelled D1..Dn in the docstrings below).
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------
# Attention context
# ---------------------------------------------------------------------------------------------


def causal_pairs_upto(n, window=None):
    """S(n) = sum_{p=1..n} min(p, W): keys seen by the first n causal queries (W=None: no window)."""
    n = np.asarray(n, dtype=np.float64)
    if window is None:
        return n * (n + 1) / 2
    w = float(window)
    return np.where(n <= w, n * (n + 1) / 2, w * (w + 1) / 2 + (n - w) * w)


def chunked_pairs_upto(n, chunk):
    """Keys seen by the first n causal queries under chunked attention (Llama 4): the query at
    1-based position p attends to the keys of its own chunk up to itself, ((p - 1) mod C) + 1 of them,
    so n = qC + r positions see q C(C+1)/2 + r(r+1)/2 keys."""
    n = np.asarray(n, dtype=np.float64)
    c = float(chunk)
    q = np.floor(n / c)
    r = n - q * c
    return q * c * (c + 1) / 2 + r * (r + 1) / 2


def attention_pairs(context_before, new_tokens, window=None, chunk=None):
    """Causal (query, key) pairs for ``new_tokens`` queries after ``context_before`` cached tokens.

    Prefill (context 0, L tokens) gives L(L+1)/2; the N_gT - 1 decode steps after a prompt of L give
    sum_{i=1}^{N-1} (L + i) = (N-1)(2L+N)/2, the exact form of the paper's (2L + N_gT) N_gT / 2
    (Eq. 21-24, 30), which counts N_gT steps where N_gT - 1 run (D7). ``window`` caps each query's
    keys at the last W; ``chunk`` restricts them to the query's own chunk of C positions.
    """
    c = np.asarray(context_before, dtype=np.float64)
    if chunk is not None:
        return chunked_pairs_upto(c + new_tokens, chunk) - chunked_pairs_upto(c, chunk)
    return causal_pairs_upto(c + new_tokens, window) - causal_pairs_upto(c, window)


# ---------------------------------------------------------------------------------------------
# Linear kernels: Eq. 9-20
# ---------------------------------------------------------------------------------------------


def linear_ops(batch, tokens, d_in, d_out, n_gpu):
    """Eq. 9 (decode, tokens = N_gT - 1) and Eq. 15 (prefill, tokens = L_seq): 2|B| d_in d_out T / N_GPU."""
    return 2.0 * batch * d_in * d_out * tokens / n_gpu


def linear_weight_load_bytes(d_in, d_out, weight_bytes, passes, n_gpu):
    """Eq. 10 (decode: weights re-read every step) and Eq. 16 (prefill: once): d_in d_out D_W passes / N_GPU."""
    return d_in * d_out * weight_bytes * passes / n_gpu


def linear_activation_load_bytes(batch, tokens, d_in, act_bytes, n_gpu):
    """Eq. 11 / Eq. 17: d_in |B| D_A T / N_GPU."""
    return d_in * batch * act_bytes * tokens / n_gpu


def linear_output_store_bytes(batch, tokens, d_out, elem_bytes, n_gpu):
    """Eq. 12/13 (decode) and Eq. 18/19 (prefill): d_out |B| D T / N_GPU.

    The K and V projections write the KV cache (``elem_bytes`` = D_KV); every other linear kernel
    stores activations (D_A). Appendix A states it the other way round (D1).
    """
    return d_out * batch * elem_bytes * tokens / n_gpu


def linear_memory_bytes(batch, tokens, passes, d_in, d_out, weight_bytes, act_bytes, store_bytes, n_gpu):
    """Eq. 14 (decode) / Eq. 20 (prefill): weights + activations in + output out."""
    return (
        linear_weight_load_bytes(d_in, d_out, weight_bytes, passes, n_gpu)
        + linear_activation_load_bytes(batch, tokens, d_in, act_bytes, n_gpu)
        + linear_output_store_bytes(batch, tokens, d_out, store_bytes, n_gpu)
    )


# ---------------------------------------------------------------------------------------------
# Attention kernels: Eq. 21-42
# ---------------------------------------------------------------------------------------------


def attention_matmul_ops(batch, pairs, head_dim, num_heads, n_gpu):
    """Eq. 21 (decode) / Eq. 32 x L_seq (prefill): one of QK^T or SV, 2 |B| d_h n_h pairs / N_GPU.

    Eq. 32 omits a factor L_seq that Eq. 38 later multiplies back in (D5); with ``pairs`` both
    phases use one formula.
    """
    return 2.0 * batch * head_dim * num_heads * pairs / n_gpu


def softmax_ops(batch, pairs, num_heads, n_gpu):
    """Eq. 22 (decode) / Eq. 33 x L_seq (prefill): 5 |B| n_h pairs / N_GPU."""
    return 5.0 * batch * num_heads * pairs / n_gpu


def fused_attention_ops(batch, pairs, head_dim, num_heads, n_gpu):
    """Eq. 27 (decode) / Eq. 38 (prefill): 2 O_matmul + O_softmax."""
    return 2.0 * attention_matmul_ops(batch, pairs, head_dim, num_heads, n_gpu) + softmax_ops(
        batch, pairs, num_heads, n_gpu
    )


def fused_attention_q_load_bytes(batch, tokens, head_dim, num_heads, act_bytes, n_gpu):
    """Eq. 28 (decode) / Eq. 39 (prefill): the queries, d_h |B| n_h D_A T / N_GPU."""
    return head_dim * batch * num_heads * act_bytes * tokens / n_gpu


def fused_attention_out_store_bytes(batch, tokens, head_dim, num_heads, act_bytes, n_gpu):
    """Eq. 29 / Eq. 40: the output, d_h |B| n_h D_A T / N_GPU (the paper's factor 2 is dropped, D3)."""
    return head_dim * batch * num_heads * act_bytes * tokens / n_gpu


def fused_attention_kv_load_bytes(batch, pairs, head_dim, num_kv_heads, kv_bytes, query_tile, n_gpu):
    """Eq. 30 (decode) / Eq. 41 (prefill): K and V read from the cache.

    2 |B| d_h n_KV D_KV pairs / query_tile / N_GPU: every tile of ``query_tile`` queries reads the
    keys it attends to once (decode: tile 1, so each cached token is read once per step). The paper's
    s_block factor is replaced by this re-read factor (D4).
    """
    return 2.0 * batch * head_dim * num_kv_heads * kv_bytes * pairs / query_tile / n_gpu


def mla_latent_kv_load_bytes(batch, kv_rows, latent_dim, kv_bytes, query_tile):
    """Multi-head latent attention (DeepSeek-V2/V3, D13): each cached token is one latent vector of
    ``latent_dim`` = kv_lora_rank + rope dims, shared by all heads as both key and value, so a query
    tile reads it once: |B| latent D_KV rows / query_tile. Not divided by N_GPU: under tensor
    parallelism every GPU holds and reads the whole latent (its heads all need it), as vLLM does.
    """
    return batch * latent_dim * kv_bytes * kv_rows / query_tile


def fused_attention_memory_bytes(batch, tokens, pairs, head_dim, num_heads, num_kv_heads, act_bytes, kv_bytes,
                                 query_tile, n_gpu):
    """Eq. 31 (decode) / Eq. 42 (prefill): queries in + output out + KV cache in.

    The paper lists the KV term twice and omits the output store (D2).
    """
    return (
        fused_attention_q_load_bytes(batch, tokens, head_dim, num_heads, act_bytes, n_gpu)
        + fused_attention_out_store_bytes(batch, tokens, head_dim, num_heads, act_bytes, n_gpu)
        + fused_attention_kv_load_bytes(batch, pairs, head_dim, num_kv_heads, kv_bytes, query_tile, n_gpu)
    )


def score_matrix_bytes(batch, pairs, num_heads, act_bytes, n_gpu):
    """Eq. 23 (decode) / Eq. 34 x L_seq (prefill): the attention score matrix, |B| n_h D_A pairs / N_GPU."""
    return batch * num_heads * act_bytes * pairs / n_gpu


def kv_cache_read_bytes(batch, pairs, head_dim, num_kv_heads, kv_bytes, n_gpu):
    """Eq. 24 (decode) / Eq. 35 x L_seq (prefill): K (or V) read by an unfused matmul."""
    return batch * head_dim * num_kv_heads * kv_bytes * pairs / n_gpu


def matmul_qk_memory_bytes(batch, tokens, pairs, kv_rows, head_dim, num_heads, num_kv_heads, act_bytes, kv_bytes,
                           n_gpu):
    """Eq. 25 (decode) / Eq. 36 (prefill): Q in, K from the cache, scores out (Table 7 swaps 25/36, D6).

    ``kv_rows`` cached rows read: the decode context sum (Eq. 24), or L_seq once per prefill (Eq. 35).
    """
    q = batch * tokens * head_dim * num_heads * act_bytes / n_gpu
    return q + kv_cache_read_bytes(batch, kv_rows, head_dim, num_kv_heads, kv_bytes, n_gpu) + score_matrix_bytes(
        batch, pairs, num_heads, act_bytes, n_gpu
    )


def matmul_sv_memory_bytes(batch, tokens, pairs, kv_rows, head_dim, num_heads, num_kv_heads, act_bytes, kv_bytes,
                           n_gpu):
    """Eq. 25 / Eq. 36 for S V: scores in, V from the cache, output out."""
    out = batch * tokens * head_dim * num_heads * act_bytes / n_gpu
    return score_matrix_bytes(batch, pairs, num_heads, act_bytes, n_gpu) + kv_cache_read_bytes(
        batch, kv_rows, head_dim, num_kv_heads, kv_bytes, n_gpu
    ) + out


def softmax_memory_bytes(batch, pairs, num_heads, act_bytes, n_gpu):
    """Eq. 26 (decode) / Eq. 37 (prefill): scores in and out (Table 7 swaps 26/37, D6)."""
    return 2.0 * score_matrix_bytes(batch, pairs, num_heads, act_bytes, n_gpu)


# ---------------------------------------------------------------------------------------------
# Normalisation, residual add, MLP activation: Eq. 43-58
# ---------------------------------------------------------------------------------------------


def norm_ops(batch, tokens, hidden, n_gpu):
    """Eq. 43 (decode) / Eq. 51 (prefill): 7 |B| size_h T / N_GPU."""
    return 7.0 * batch * hidden * tokens / n_gpu


def add_ops(batch, tokens, hidden, n_gpu):
    """Eq. 44 (decode) / Eq. 52 (prefill): |B| size_h T / N_GPU."""
    return 1.0 * batch * hidden * tokens / n_gpu


def act_ops(batch, tokens, width, n_gpu):
    """Eq. 45 (decode) / Eq. 53 (prefill): 2 |B| width T / N_GPU.

    The activation runs over the MLP's intermediate width, not size_h as printed (D8).
    """
    return 2.0 * batch * width * tokens / n_gpu


def norm_memory_bytes(batch, tokens, hidden, act_bytes, weight_bytes, norm_params, passes, n_gpu):
    """Eq. 46+49 (decode) / Eq. 54+57 (prefill): activations in and out, plus the gain (and bias).

    The paper loads no weights for norms; their gain vector is read each pass (D9).
    """
    return (2.0 * batch * hidden * act_bytes * tokens + norm_params * weight_bytes * passes) / n_gpu


def add_memory_bytes(batch, tokens, hidden, act_bytes, n_gpu):
    """Eq. 46+49 / Eq. 54+57 for the residual add: two inputs read, one stored (3x, not 2x; D10)."""
    return 3.0 * batch * hidden * act_bytes * tokens / n_gpu


def act_memory_bytes(batch, tokens, width, act_bytes, gated, n_gpu):
    """Eq. 47/48/50 (decode) / Eq. 55/56/58 (prefill): inputs (2 when gated) plus output.

    Eq. 50 multiplies the load by 3 where Eq. 58 adds load and store; we use Eq. 58 for both (D11).
    """
    n_in = 2.0 if gated else 1.0
    return (n_in + 1.0) * batch * width * act_bytes * tokens / n_gpu


# ---------------------------------------------------------------------------------------------
# All-reduce under tensor parallelism: Eq. 2-7
# ---------------------------------------------------------------------------------------------


def allreduce_ops(batch, tokens, hidden, n_gpu):
    """Eq. 2 (decode) / Eq. 3 (prefill): n m / l additions per GPU, n = |B| T rows, m = size_h."""
    return batch * tokens * hidden / n_gpu


def allreduce_memory_bytes(batch, tokens, hidden, act_bytes, n_gpu):
    """Eq. 4 / Eq. 5: 2 O_allr D_A."""
    return 2.0 * allreduce_ops(batch, tokens, hidden, n_gpu) * act_bytes


def allreduce_network_bytes(batch, tokens, hidden, act_bytes, n_gpu):
    """Eq. 6 / Eq. 7, for a ring all-reduce: 2 (l-1)/l n m D_A bytes leave each GPU.

    The paper counts only the reduce-scatter half, (l-1)/l n m D_A (D12). Zero for one GPU.
    """
    l = np.asarray(n_gpu, dtype=np.float64)
    return 2.0 * (l - 1.0) / l * batch * tokens * hidden * act_bytes


# ---------------------------------------------------------------------------------------------
# Roofline: Eq. 8
# ---------------------------------------------------------------------------------------------


def roofline_performance(ops, traffic_bytes, peak_ops_per_s, bandwidth_bytes_per_s):
    """Eq. 8: P = BW * (O/M) below the ridge point Th/BW, else Th (ops/s).

    Pass network bytes and network bandwidth for all-reduce kernels (NAI, NRP). A kernel with no
    traffic is compute bound.
    """
    ops = np.asarray(ops, dtype=np.float64)
    traffic = np.asarray(traffic_bytes, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        intensity = np.where(traffic > 0, ops / np.where(traffic > 0, traffic, 1.0), np.inf)
    ridge = peak_ops_per_s / bandwidth_bytes_per_s
    return np.where(intensity < ridge, bandwidth_bytes_per_s * intensity, peak_ops_per_s)


def roofline_time_s(ops, performance_ops_per_s):
    """Time the Roofline allows for ``ops`` at performance P (s); 0 for an empty kernel."""
    ops = np.asarray(ops, dtype=np.float64)
    perf = np.asarray(performance_ops_per_s, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ops > 0, ops / np.where(perf > 0, perf, 1.0), 0.0)


def expected_unique_experts(num_experts, experts_per_token, routed_tokens):
    """Experts whose weights a pass must load when ``routed_tokens`` tokens pick top-k of E uniformly."""
    e = float(num_experts)
    t = np.asarray(routed_tokens, dtype=np.float64)
    return e * (1.0 - (1.0 - experts_per_token / e) ** t)
