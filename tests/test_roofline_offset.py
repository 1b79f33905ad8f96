"""The GNN on top of the Roofline energy (predictors/features.roofline_offset, the ``vllm`` profile).

Truths from outside the offset code: the kernel graph's own whole-request Roofline times
(``LayerTemplate.totals``) times the GPU table's TDP, the torch module against its NumPy copy, and
the shipped weights files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmco2_serve.predictors.features import GLOBAL_FEATURE_NAMES, NODE_FEATURE_NAMES, Standardizer, featurize, \
    roofline_offset
from llmco2_serve.predictors.gnn import LLMCO2GNN, NumpyGNN, mean_adjacency

QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "vocab_size": 151936, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _template(n_gpu=2):
    from llmco2_serve.hardware.gpus import gpu_spec
    from llmco2_serve.workload.arch import ModelArch
    from llmco2_serve.workload.graph import Parallelism, build_layer_template
    from llmco2_serve.workload.precision import Precision

    gpu = gpu_spec("H100")
    arch = ModelArch.from_hf_config(QWEN3_30B_A3B)
    return build_layer_template(arch, Precision.from_name("bfloat16"), gpu, Parallelism(tensor_parallel=n_gpu)), gpu


def _batch_features():
    t, gpu = _template()
    batch = np.array([8.0, 64.0, 512.0, 3000.0])
    gb = featurize(t, batch, np.full(4, 256.0), np.full(4, 900.0), gpu)
    return t, gpu, gb


def test_offset_alone_is_the_roofline_energy_at_tdp():
    """With the network's part at zero, energy = the kernel graph's whole-request work at the GPU's
    rates (FLOPs at peak + bytes at memory bandwidth + all-reduce bytes over the interconnect) x TDP."""
    t, gpu, gb = _batch_features()
    std = Standardizer.fit(gb.node_x.reshape(-1, gb.node_x.shape[-1]), gb.global_x)
    torch.manual_seed(0)
    model = LLMCO2GNN(len(NODE_FEATURE_NAMES), len(GLOBAL_FEATURE_NAMES), hidden=8,
                      offset=roofline_offset(std, layer_scaled=True))
    with torch.no_grad():
        model.lin2.weight.zero_()
        model.lin2.bias.zero_()
    out = NumpyGNN(model.numpy_weights()).forward(std.nodes(gb.node_x), mean_adjacency(gb.edge_index, t.n_nodes),
                                                  std.globals(gb.global_x))
    layers = t.arch.num_layers
    prefill_j = np.exp(out[:, 0]) * layers
    decode_j = np.exp(out[:, 1]) * gb.decode_steps * layers
    tot = gb.totals

    n_gpu = t.parallelism.n_gpu
    # 4 us per kernel of every layer on every GPU, once per pass (the prefill's one, each decode step)
    latency_s_per_pass = 4e-6 * t.n_nodes * layers * n_gpu

    def at_tdp(flops, mem_bytes, net_bytes, passes):  # all GPUs' work / one GPU's rate = GPU-seconds
        return (flops / t.peak_ops_per_s + mem_bytes / t.memory_bandwidth_bytes_per_s
                + net_bytes / t.network_bandwidth_bytes_per_s + latency_s_per_pass * passes) * gpu.tdp_w

    assert n_gpu == 2 and np.all(tot.decode_network_bytes > 0)  # the all-reduce term counts
    assert np.allclose(prefill_j, at_tdp(tot.prefill_flops, tot.prefill_bytes, tot.prefill_network_bytes, 1.0),
                       rtol=1e-6)
    assert np.allclose(decode_j, at_tdp(tot.decode_flops, tot.decode_bytes, tot.decode_network_bytes,
                                        gb.decode_steps), rtol=1e-6)
    # the latency term matters at small batch only: at batch 8 it is a sizeable share of a decode
    # step, at batch 3,000 a small one
    share = latency_s_per_pass * gb.decode_steps * gpu.tdp_w / decode_j
    assert share[0] > 0.1 and share[-1] < share[0] / 3
    # and it is at least the Roofline (kernel-wise max of compute and memory time) x TDP x GPUs
    assert np.all(decode_j >= tot.decode_time_s * gpu.tdp_w * t.parallelism.n_gpu * (1 - 1e-9))
    # The batch physics comes with it: the per-sequence decode energy falls with the batch (shared
    # weight reads), by less than 1/batch (own KV reads and compute grow with it).
    per_seq = decode_j / np.array([8.0, 64.0, 512.0, 3000.0])
    assert np.all(np.diff(per_seq) < 0)
    assert per_seq[0] / per_seq[-1] < 3000.0 / 8.0


def test_torch_and_numpy_agree_with_an_offset_and_it_survives_a_reload():
    t, gpu, gb = _batch_features()
    std = Standardizer.fit(gb.node_x.reshape(-1, gb.node_x.shape[-1]), gb.global_x)
    torch.manual_seed(1)
    model = LLMCO2GNN(len(NODE_FEATURE_NAMES), len(GLOBAL_FEATURE_NAMES), hidden=8, offset=roofline_offset(std))
    x, g = std.nodes(gb.node_x), std.globals(gb.global_x)
    r, n = x.shape[:2]
    ei = torch.tensor(np.concatenate([gb.edge_index + i * n for i in range(r)], axis=1))
    batch = torch.arange(r).repeat_interleave(n)
    with torch.no_grad():
        ref = model(torch.tensor(x.reshape(r * n, -1), dtype=torch.float32), ei, batch,
                    torch.tensor(g, dtype=torch.float32)).numpy()
    weights = model.numpy_weights()
    out = NumpyGNN(weights).forward(x, mean_adjacency(gb.edge_index, n), g)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-4)
    # `llmco2 retrain` rebuilds the module from saved arrays: the offset must come back with them
    again = LLMCO2GNN.from_numpy_weights(weights, len(NODE_FEATURE_NAMES), len(GLOBAL_FEATURE_NAMES))
    assert again.has_offset and "offset=roofline" in repr(again)
    assert not any(name.startswith("offset_") for name, _ in again.named_parameters())  # fixed, not trained
    assert np.allclose(NumpyGNN(again.numpy_weights()).forward(x, mean_adjacency(gb.edge_index, n), g), out)
    with pytest.raises(KeyError, match="not LLMCO2GNN weights"):
        LLMCO2GNN.from_numpy_weights({k: v for k, v in weights.items() if k != "offset_std"},
                                     len(NODE_FEATURE_NAMES), len(GLOBAL_FEATURE_NAMES))


def test_profiles_use_the_offset_only_where_trained_with_it():
    from llmco2_serve.prediction.predictor import load_weights

    vllm, eager = load_weights(profile="vllm"), load_weights(profile="hf-eager")
    assert "offset_coef" in vllm.arrays and vllm.metadata["train_config"]["roofline_offset"] is True
    assert "offset_coef" not in eager.arrays and NumpyGNN(eager.arrays).offset is None
    assert vllm.metadata["version"] != eager.metadata["version"]  # a new label: calibrations restart


LLAMA_3_1_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]}


def test_offset_decode_step_matches_the_published_weight_read_energy():
    """Truth from published numbers, not from the kernel graph: a batch-1 decode step of
    Llama-3.1-8B (8.03 B parameters, Meta's model card; bf16 = 2 bytes each) on an H100 SXM
    (3.35 TB/s HBM3, 700 W TDP, NVIDIA's datasheet) is memory-bound: it reads every weight once,
    except the input embedding table (128,256 x 4,096 = 0.525 B parameters, one row read). At TDP
    that is 2 x (8.03 - 0.525) e9 B / 3.35e12 B/s x 700 W = 3.14 J; the KV cache of a short
    context and the compute (15 GFLOP at 989 TFLOP/s) add under 1%."""
    from llmco2_serve.hardware.gpus import gpu_spec
    from llmco2_serve.workload.arch import ModelArch
    from llmco2_serve.workload.graph import Parallelism, build_layer_template
    from llmco2_serve.workload.precision import Precision

    gpu = gpu_spec("H100")
    t = build_layer_template(ModelArch.from_hf_config(LLAMA_3_1_8B), Precision.from_name("bfloat16"), gpu,
                             Parallelism())
    gb = featurize(t, np.array([1.0]), np.array([16.0]), np.array([33.0]), gpu)  # 32 decode steps
    std = Standardizer.fit(gb.node_x.reshape(-1, gb.node_x.shape[-1]), gb.global_x)
    model = LLMCO2GNN(len(NODE_FEATURE_NAMES), len(GLOBAL_FEATURE_NAMES), hidden=8,
                      offset=roofline_offset(std, layer_scaled=True))
    with torch.no_grad():  # the network's correction at zero: the offset alone
        model.lin2.weight.zero_()
        model.lin2.bias.zero_()
    out = NumpyGNN(model.numpy_weights()).forward(std.nodes(gb.node_x), mean_adjacency(gb.edge_index, t.n_nodes),
                                                  std.globals(gb.global_x))
    per_step_j = float(np.exp(out[0, 1]) * t.arch.num_layers)  # per-layer energy of one decode step x layers
    published_j = 2.0 * (8.03e9 - 128256 * 4096) / 3.35e12 * 700.0
    # on top of the weight reads, the fixed 4 us per kernel of the layer graph (features.KERNEL_LATENCY_S)
    latency_j = 4e-6 * t.n_nodes * t.arch.num_layers * 700.0
    assert per_step_j - latency_j == pytest.approx(published_j, rel=0.05)
    assert 0.1 < latency_j / per_step_j < 0.5  # a batch-1 step is still mostly its weight reads
