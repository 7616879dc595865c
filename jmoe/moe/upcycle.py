"""Upcycling: a MoE layer's params from a trained dense FFN, and more experts for a trained MoE
(docs/algorithms.md, "Upcycling").

Every function takes and returns plain params trees of one layer (`jmoe.MoE`'s tree, or the
dense `mlp` tree of `w_gate` / `w_up` `[..., D, F]` and `w_down` `[..., F, D]`). Leading axes
are kept, so the same call works on a scanned stack of layers (`[L, ...]`, `scan_layers`) and on
a chain of routers (`[C, D, E]`). `jmoe.lm.upcycle` applies them to a whole `Transformer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Axis of the experts in each expert parameter, counted from the end (leading axes are kept).
_EXPERT_AXIS = {"w_gate": -3, "w_up": -3, "w_down": -3, "b_gate": -2, "b_up": -2, "b_down": -2}


def _noise(rng, std: float, like: jax.Array) -> jax.Array:
    if std == 0:
        return jnp.zeros_like(like)
    if rng is None:
        raise ValueError(f"noise_std={std} needs an rng (a jax.random key)")
    return (std * jax.random.normal(rng, like.shape, jnp.float32)).astype(like.dtype)


def _check_std(name: str, std: float) -> None:
    if std < 0:
        raise ValueError(f"{name}={std} must be >= 0")


def upcycle_layer(
    dense_mlp: dict, template: dict, *, noise_std: float = 0.0, rng: jax.Array | None = None
) -> dict:
    """A MoE layer's params whose every expert is the dense FFN (sparse upcycling).

    Args:
      dense_mlp: the dense SwiGLU FFN: `w_gate`, `w_up` `[..., D, F]`, `w_down` `[..., F, D]`.
      template: params of the target `jmoe.MoE` (e.g. from its `init`, same leading axes), with
        `num_experts` E, `d_ff` F and a "swiglu" activation. It gives the shapes and the
        parameters that have no dense counterpart.
      noise_std: standard deviation of the Gaussian noise added to each expert's copy (0: exact
        copies); each expert gets its own draw.
      rng: a `jax.random` key, needed when `noise_std > 0`.

    Returns:
      The template with `experts/w_*` = the dense weights (+ noise), expert biases 0, the router
      kernel (and `router/bias`) 0 so every expert gets the same logit (uniform routing), and any
      shared expert's `w_down` 0 so it adds nothing at first (the shared gate is kept).
      With `noise_std=0` the layer reproduces the dense FFN exactly for a top-k router that
      renormalises its weights (softmax or sigmoid; ties go to the lowest experts) and for null
      experts (whose columns come last); without renormalisation the output is the dense FFN
      times the sum of the k weights (`k / E` for softmax, `k / 2` for sigmoid).
    """
    _check_std("noise_std", noise_std)
    experts = template["experts"]
    if set(dense_mlp) != {"w_gate", "w_up", "w_down"} or "w_gate" not in experts:
        raise ValueError(
            f"upcycle_layer needs a dense SwiGLU FFN (w_gate, w_up, w_down), got "
            f"{sorted(dense_mlp)}, and a gated MoE template, got experts {sorted(experts)}"
        )
    out_experts = dict(experts)
    keys = iter(jax.random.split(rng, 3)) if rng is not None else iter((None,) * 3)
    for name in ("w_gate", "w_up", "w_down"):
        dense, target = dense_mlp[name], experts[name]
        expert_shape = target.shape[:-3] + target.shape[-2:]
        if dense.shape != expert_shape:
            raise ValueError(
                f"dense {name} {dense.shape} does not match the experts' {target.shape} "
                f"(one expert: {expert_shape}); the MoE's d_ff must equal the dense d_ff"
            )
        copies = jnp.broadcast_to(jnp.expand_dims(dense, -3), target.shape).astype(target.dtype)
        out_experts[name] = copies + _noise(next(keys), noise_std, copies)
    for name in ("b_gate", "b_up", "b_down"):
        if name in experts:
            out_experts[name] = jnp.zeros_like(experts[name])
    out = {**template, "experts": out_experts}
    out["router"] = jax.tree.map(jnp.zeros_like, template["router"])
    if "shared" in template:
        out["shared"] = {
            **template["shared"],
            "w_down": jnp.zeros_like(template["shared"]["w_down"]),
        }
    return out


def grow_experts(
    params: dict,
    moe_state: dict,
    num_experts: int,
    *,
    source: Sequence[int] | None = None,
    noise_std: float = 0.0,
    expert_noise_std: float = 0.0,
    rng: jax.Array | None = None,
) -> tuple[dict, dict]:
    """A trained MoE layer with more experts, each new one a copy of an existing one.

    Args:
      params: the layer's params (E experts, any null experts: their router columns stay last).
      moe_state: the layer's `moe_state` (the selection bias `bias` `[..., E]` is copied with its
        expert; other entries are kept).
      num_experts: the new expert count E' >= E.
      source: the expert each new expert `E + j` copies (`E' - E` indices); default round robin,
        `j % E`.
      noise_std: standard deviation of noise on the new experts' router columns (0: they tie
        with their source, and `jax.lax.top_k` picks the lower index first).
      expert_noise_std: standard deviation of noise on the new experts' weights.
      rng: a `jax.random` key, needed when either noise is > 0.

    Returns:
      `(params, moe_state)` for the same config with `num_experts=E'` (the router's k is the
      caller's choice). With no noise and a renormalised softmax (or sigmoid) top-k, a token's
      output is unchanged whenever its new top-k' holds, for one c, exactly c copies of each of
      the k experts it chose before (a copy shares its source's logit, and renormalisation
      cancels the new softmax denominator): in particular for k' = k = 1 (with
      `renorm_when_k1`), and for k' = c * k when every expert has c - 1 copies (E' = c * E,
      round robin). Otherwise copies that tie with their source take slots from the next
      experts and the output changes.
    """
    _check_std("noise_std", noise_std)
    _check_std("expert_noise_std", expert_noise_std)
    e = params["experts"]["w_down"].shape[-3]
    if num_experts < e:
        raise ValueError(f"grow_experts: num_experts={num_experts} is below the current E={e}")
    source = [j % e for j in range(num_experts - e)] if source is None else list(source)
    if len(source) != num_experts - e or any(not 0 <= s < e for s in source):
        raise ValueError(
            f"grow_experts: source={source} must hold {num_experts - e} expert indices in [0, {e})"
        )
    src = jnp.asarray(source, jnp.int32)
    key_router, key_experts = jax.random.split(rng) if rng is not None else (None, None)

    def grow(a, axis, std, key):
        new = jnp.take(a, src, axis=a.ndim + axis)
        return jnp.concatenate([a, new + _noise(key, std, new)], axis=a.ndim + axis)

    experts = params["experts"]
    keys = jax.random.split(key_experts, len(experts)) if key_experts is not None else None
    out_experts = {
        name: grow(a, _EXPERT_AXIS[name], expert_noise_std, None if keys is None else keys[i])
        for i, (name, a) in enumerate(sorted(experts.items()))
    }
    # New true experts go right after the E true columns, before any null-expert columns.
    router = {}
    for name, a in params["router"].items():
        new = jnp.take(a, src, axis=-1)
        if name == "kernel":
            new = new + _noise(key_router, noise_std, new)
        router[name] = jnp.concatenate([a[..., :e], new, a[..., e:]], axis=-1)
    state = {name: grow(a, -1, 0.0, None) if name == "bias" else a for name, a in moe_state.items()}
    return {**params, "experts": out_experts, "router": router}, state
