"""The model of the work a request does: architectures read from HF configs, precision/quantisation, the Appendix A
kernel equations, the per-layer kernel graph, per-step row costs and the output-length prior. No hardware, no vLLM."""
