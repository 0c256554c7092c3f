"""Stage 2, calibrate: activation statistics (in-graph, float64), gradient statistics for NL-MSE, sharding under torchrun."""
