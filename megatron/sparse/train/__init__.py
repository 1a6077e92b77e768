"""MaskLLM mask learning: frozen weights, trainable 2:4 mask logits."""
