"""Export: trimmed HF checkpoints and the packed 2:4 mask file."""
