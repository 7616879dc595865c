"""Auxiliary router losses: pure, unscaled functions of a `Routing` (docs/algorithms.md).

Coefficients are applied by the caller, once. Every loss takes an optional `token_mask` `[T]`
(True = real token) so padding tokens count neither in the expert loads nor in the mean scores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.moe.routing import Routing

NORMALIZATIONS = ("switch_top1", "per_assignment", "per_assignment_over_k")
NULL_BALANCES = ("grouped", "individual")


def _token_weights(num_tokens: int, token_mask: jax.Array | None) -> jax.Array:
    if token_mask is None:
        return jnp.ones((num_tokens,), jnp.float32)
    return token_mask.reshape(num_tokens).astype(jnp.float32)


def masked_mean(v_T: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """Mean of `v_T` over the tokens where `token_mask` is True (all tokens if None)."""
    w_T = _token_weights(v_T.shape[0], token_mask)
    return jnp.sum(w_T * v_T) / jnp.maximum(w_T.sum(), 1.0)


def _normalized_probs(probs_TxE: jax.Array) -> jax.Array:
    """Scores as a per-token distribution (a no-op for softmax; DeepSeek-V3 rule for sigmoid)."""
    return probs_TxE / probs_TxE.sum(-1, keepdims=True)


def expert_counts(
    expert_ids_TxK: jax.Array,
    valid_TxK: jax.Array,
    num_experts: int,
    token_mask: jax.Array | None = None,
) -> jax.Array:
    """Number of valid (token, slot) assignments per expert, `[E]` float32."""
    t = expert_ids_TxK.shape[0]
    w_TxK = valid_TxK.astype(jnp.float32) * _token_weights(t, token_mask)[:, None]
    return jnp.zeros((num_experts,), jnp.float32).at[expert_ids_TxK].add(w_TxK, mode="drop")


def load_balance(
    routing: Routing,
    *,
    num_experts: int,
    normalization: str = "per_assignment_over_k",
    num_null: int = 0,
    null_balance: str = "grouped",
    token_mask: jax.Array | None = None,
) -> jax.Array:
    """Load-balance loss `E * sum_i f_i * P_i`, unscaled (Switch / GShard / HF / Megatron).

    `P_i` is the mean router score of expert i; `f_i` is the load of expert i normalised by
    `normalization`:
      - "switch_top1": fraction of tokens whose first choice is i (1 at perfect balance);
      - "per_assignment": assignments to i per token, counted per slot (HF; k at balance);
      - "per_assignment_over_k": assignments to i over k*T (Megatron, DeepSeek; 1 at balance).
    Gradient flows through `P` only.

    With null experts (AdaMoE; docs/algorithms.md, "Null experts: grouped or individual") all
    `E + num_null` experts are balanced: "grouped" (the paper's intent) gives every null expert
    the mean null load, so only the total null usage is balanced against the true experts;
    "individual" counts each null expert on its own (from `routing.choices`, as the HF-based
    AdaMoE code does).

    Args:
      routing: a `Routing` over `[T, K]` slots.
      num_experts: E, the true experts.
      normalization: one of `NORMALIZATIONS`.
      num_null: null experts M (the last M columns of `routing.probs`).
      null_balance: "grouped" or "individual".
      token_mask: optional `[T]` bool, False for padding tokens.

    Returns:
      A float32 scalar; E at full collapse onto one expert with "switch_top1".
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")
    if null_balance not in NULL_BALANCES:
        raise ValueError(f"null_balance={null_balance!r} is not one of {NULL_BALANCES}")
    t, k = routing.expert_ids.shape
    slots = 1 if normalization == "switch_top1" else k
    ids, valid = routing.expert_ids[:, :slots], routing.valid[:, :slots]
    counts_E = expert_counts(ids, valid, num_experts, token_mask)
    if num_null:
        counts_E = jnp.concatenate(
            [
                counts_E,
                _null_counts(routing, slots, num_experts, num_null, null_balance, token_mask),
            ]
        )
    w_T = _token_weights(t, token_mask)
    n_tokens = jnp.maximum(w_T.sum(), 1.0)
    f_E = counts_E / n_tokens
    if normalization == "per_assignment_over_k":
        f_E = f_E / k
    e_all = num_experts + num_null
    p_E = (_normalized_probs(routing.probs)[:, :e_all] * w_T[:, None]).sum(0) / n_tokens
    return e_all * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)


def _null_counts(routing, slots, num_experts, num_null, null_balance, token_mask):
    """Null-expert loads `[num_null]` over the first `slots` slots."""
    w_T = _token_weights(routing.expert_ids.shape[0], token_mask)
    if null_balance == "grouped":
        null_picks = jnp.sum((~routing.valid[:, :slots]).sum(-1) * w_T)
        return jnp.full((num_null,), null_picks / num_null)
    if routing.choices is None:
        raise ValueError(
            "null_balance='individual' needs the raw picks in Routing.choices "
            "(set by jmoe.routing.null_experts)"
        )
    choice = routing.choices[:, :slots]
    return expert_counts(choice - num_experts, choice >= num_experts, num_null, token_mask)


def router_z_loss(logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)**2`, unscaled.

    Args:
      logits: `[T, E]` raw router logits.
      token_mask: optional `[T]` bool, False for padding tokens.
    """
    lse_T = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return masked_mean(lse_T**2, token_mask)


def routing_entropy(probs: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """Mean over tokens of the entropy `-sum_e p log p` of the (normalised) router scores.

    Args:
      probs: `[T, E]` router scores; rows are normalised to sum to 1 first.
      token_mask: optional `[T]` bool, False for padding tokens.
    """
    p_TxE = _normalized_probs(probs.astype(jnp.float32))
    ent_T = -jnp.sum(
        jnp.where(p_TxE > 0, p_TxE * jnp.log(jnp.where(p_TxE > 0, p_TxE, 1.0)), 0.0), axis=-1
    )
    return masked_mean(ent_T, token_mask)


def sequence_balance(
    routing: Routing,
    *,
    num_experts: int,
    seq_len: int,
    token_mask: jax.Array | None = None,
) -> jax.Array:
    """DeepSeek-V3 sequence-wise balance loss, unscaled (docs/algorithms.md).

    Per sequence: `sum_i f_i P_i` with `f_i = E / (k L) * #{t: i in top-k of the unbiased scores}`
    and `P_i` the mean of the per-token normalised scores; averaged over sequences. 1 at perfect
    balance; sequences that are all padding are left out. The top-k is recomputed on the
    unbiased scores, so a selection bias or group limit does not hide an imbalance.

    Args:
      routing: a `Routing` over `T = B * seq_len` tokens (sequence-major) and k slots.
      num_experts: E.
      seq_len: tokens per sequence L.
      token_mask: optional `[T]` bool, False for padding tokens.
    """
    t, k = routing.expert_ids.shape
    if t == 0:  # no tokens, no sequences
        return jnp.zeros((), jnp.float32)
    if t % seq_len:
        raise ValueError(f"sequence_balance: tokens T={t} is not a multiple of {seq_len=}")
    b = t // seq_len
    probs_TxE = routing.probs[:, :num_experts]
    _, top_TxK = jax.lax.top_k(jax.lax.stop_gradient(probs_TxE), k)
    w_BxL = _token_weights(t, token_mask).reshape(b, seq_len)
    onehot_BxLxE = jax.nn.one_hot(top_TxK, num_experts).sum(-2).reshape(b, seq_len, num_experts)
    n_B = jnp.maximum(w_BxL.sum(-1), 1.0)
    f_BxE = (onehot_BxLxE * w_BxL[..., None]).sum(1) * num_experts / (k * n_B[:, None])
    p_BxLxE = _normalized_probs(probs_TxE).reshape(b, seq_len, num_experts)
    p_BxE = (p_BxLxE * w_BxL[..., None]).sum(1) / n_B[:, None]
    real_B = (w_BxL.sum(-1) > 0).astype(jnp.float32)  # all-padding sequences are left out
    return jnp.sum(real_B * jnp.sum(f_BxE * p_BxE, axis=-1)) / jnp.maximum(real_B.sum(), 1.0)


def update_bias(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing step: `b += rate * sign(mean(load) - load)`.

    Overloaded experts are pushed down, underloaded ones up, exactly balanced ones stay. Apply it
    outside autodiff, after the optimizer step, with the global (all-reduced) loads of the step.

    Args:
      bias: `[..., E]` float32 selection bias (`[C, E]` for a chain of C routers).
      tokens_per_expert: `[..., E]` assignments per expert this step.
      rate: the update rate gamma (DeepSeek-V3: 1e-3).
    """
    load = tokens_per_expert.astype(jnp.float32)
    return bias + rate * jnp.sign(load.mean(-1, keepdims=True) - load)


def update_budget(
    budget: jax.Array, active_experts: jax.Array, target: float, rate: float
) -> jax.Array:
    """Compute-budget controller step: `budget += rate * (active - target)`.

    The budget is pressure toward fewer experts (a logit offset on the null experts, or a cut of
    the top-p threshold): above the target it rises, below it falls, so the batch mean of active
    experts per token settles at `target` while each token's count still varies. Apply outside
    autodiff, like `update_bias`.

    Args:
      budget: float32 scalar controller state.
      active_experts: mean real expert computations per token this step.
      target: the wanted mean.
      rate: step size.
    """
    return budget + rate * (active_experts.astype(jnp.float32) - target)
