"""Compute backends of the MoE layer: the grouped matmul, the expert MLP and the fused gating,
each with XLA, `jax.lax.ragged_dot` and Pallas implementations chosen in one registry."""
