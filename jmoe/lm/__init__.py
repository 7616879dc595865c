"""The decoder-only language model around the MoE layer."""
