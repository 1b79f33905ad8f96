"""Energy predictors: the LLMCO2 GNN, baselines, training and sampling."""
