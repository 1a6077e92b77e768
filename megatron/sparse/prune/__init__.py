"""One-shot 2:4 pruning: magnitude, Wanda, SparseGPT, and the sequential calibration driver."""
