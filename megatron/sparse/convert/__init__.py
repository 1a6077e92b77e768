"""Pure conversions between state-dict layouts (HF <-> Megatron, TP shards)."""
