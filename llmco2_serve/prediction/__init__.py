"""Serving-time prediction: the embedded GNN predictor, the precomputed fast path, online calibration from the
deployment's own measurements, retraining with hot reload, and the measurement records it trains on."""
