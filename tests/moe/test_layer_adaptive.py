"""jmoe.MoE with adaptive routers, chain-of-experts, compute accounting and the budget controller.

Oracles: the routers of tests/moe_reference.py (`ref_null_experts`, `ref_top_p`,
`ref_expert_choice`, `ref_top_k`, `ref_capacity`, written from docs/algorithms.md)
fix the expert ids and weights. The expected output is a float64 NumPy loop over tokens and slots
(`_np_step`); for gradients the combine weights of the same FIXED ids are recomputed
differentiably in jnp from the router kernel and every expert runs densely (`_ref_step`), so
`jax.grad` gives the expected gradients w.r.t. the input, the router kernel and the expert
weights. Chain-of-experts is unrolled by hand. The reference never calls jmoe's routing,
dispatch or grouped-matmul code.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
import moe_reference as ref
from jmoe.moe.layer import update_state

D, F = 8, 16
B, S = 2, 8  # T = 16 tokens
MARGIN = 3e-5  # reference decisions must be this far from a tie / threshold (float32 vs float64)
RTOL, ATOL = 1e-5, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


# ================================================================================ the reference


def _kernel(params, step: int, chain_steps: int):
    kernel = params["router"]["kernel"]
    return kernel if chain_steps == 1 else kernel[step]


def _desc_gaps(v: np.ndarray, n: int) -> float:
    """Smallest gap between consecutive values among the `n + 1` largest of each row."""
    s = -np.sort(-v, axis=-1)[:, : n + 1]
    return float(np.min(s[:, :-1] - s[:, 1:])) if s.shape[1] > 1 else np.inf


def _route_ref(cfg: jmoe.MoEConfig, logits: np.ndarray, bias, budget: float) -> dict:
    """Reference routing decision of one step (float64) and its distance to any tie / threshold."""
    t, e = logits.shape[0], cfg.num_experts
    if cfg.router.kind == "top_k":
        ids, weights, probs = ref.ref_top_k(
            logits,
            cfg.router.k,
            score=cfg.router.score,
            normalize=cfg.router.normalize,
            scale=cfg.router.scale,
            bias=bias,
            renorm_when_k1=cfg.router.renorm_when_k1,
        )
        valid, choices = np.ones(ids.shape, bool), ids
        margin = _desc_gaps(probs + np.asarray(bias, np.float64), cfg.router.k)
    elif cfg.router.kind == "null_experts":
        ids, weights, valid, probs, choices = ref.ref_null_experts(
            logits, cfg.router.k, cfg.router.num_null, null_offset=budget
        )
        sel = logits + np.where(np.arange(e + cfg.router.num_null) >= e, budget, 0.0)
        margin = _desc_gaps(sel, cfg.router.k)
    elif cfg.router.kind == "top_p":
        p = float(np.clip(cfg.router.p - budget, 1e-6, 1.0))
        ids, weights, valid, probs = ref.ref_top_p(
            logits, p, max_k=cfg.router.max_k, boundary=cfg.router.boundary
        )
        choices = ids
        cum = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)[:, :-1]
        margin = min(_desc_gaps(probs, e - 1), float(np.min(np.abs(cum - p))))
    elif cfg.router.kind == "expert_choice":
        capacity = cfg.router.capacity(t, cfg.num_experts, deterministic=True)
        ids, weights, valid, probs = ref.ref_expert_choice(logits, capacity)
        choices = ids
        cols = -np.sort(-probs.T, axis=-1)
        margin = (
            np.inf if capacity >= t else float(np.min(cols[:, capacity - 1] - cols[:, capacity]))
        )
    else:
        raise ValueError(cfg.router)
    return dict(
        ids=ids,
        weights=weights,
        valid=valid,
        probs=probs,
        choices=choices,
        logits=logits,
        margin=margin,
    )


def _kept_ref(cfg: jmoe.MoEConfig, route: dict, num_tokens: int) -> np.ndarray:
    """Valid slots that survive the token-choice capacity (expert choice has none)."""
    capacity = None if cfg.router.kind == "expert_choice" else cfg.capacity(num_tokens, True)
    if capacity is None:
        return route["valid"].copy()
    return ref.ref_capacity(route["ids"], cfg.num_experts, capacity, route["valid"])


def _weights_ref(cfg: jmoe.MoEConfig, logits, route: dict):
    """Differentiable combine weights `[T, K]` of the FIXED ids / valid slots of `route`.

    top_k: scores of the chosen experts (renormalised if `normalize and k > 1`, times `scale`);
    null: softmax over all E + M of the valid (true) picks, renormalised among them (0 if none);
    top_p, expert_choice: the raw softmax probabilities of the valid slots.
    """
    ids, valid = route["ids"], route["valid"]
    rows = np.arange(ids.shape[0])[:, None]
    if cfg.router.kind == "top_k":
        probs = (
            jax.nn.softmax(logits, -1) if cfg.router.score == "softmax" else jax.nn.sigmoid(logits)
        )
        w = probs[rows, ids]
        if cfg.router.normalize and (ids.shape[1] > 1 or cfg.router.renorm_when_k1):
            w = w / jnp.sum(w, -1, keepdims=True)
        return w * cfg.router.scale
    return ref.ref_masked_weights_jnp(
        logits, ids, valid, normalize=cfg.router.kind == "null_experts"
    )


def _jnp_mlp(w: dict, x_TxD, activation: str):
    if activation == "swiglu":
        h = jax.nn.silu(x_TxD @ w["w_gate"]) * (x_TxD @ w["w_up"])
    elif activation == "gelu":
        h = jax.nn.gelu(x_TxD @ w["w_up"], approximate=False)
    else:
        h = jax.nn.relu(x_TxD @ w["w_up"])
    return h @ w["w_down"]


def _ref_step(cfg, params, h_TxD, step: int, route: dict):
    """One MoE pass with fixed routing, differentiable: every expert runs densely on every token
    and is mixed with the combine matrix `W[t, e] = sum of the kept slots' weights for e` (no
    sorting, no grouped matmul); plus the shared expert. Used for gradients; its output is checked
    against the per-token float64 loop `_np_step`."""
    logits = jnp.dot(
        h_TxD.astype(jnp.float32),
        _kernel(params, step, cfg.chain_steps).astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    weights_TxK = _weights_ref(cfg, logits, route)
    e = cfg.num_experts
    onehot_TxKxE = (route["ids"][..., None] == np.arange(e)) & route["kept"][..., None]
    combine_TxE = jnp.sum(weights_TxK[..., None] * onehot_TxKxE.astype(np.float32), axis=1)
    experts = params["experts"]
    out = 0.0
    for i in range(e):
        w_i = {name: experts[name][i] for name in experts}
        out = out + combine_TxE[:, i : i + 1] * _jnp_mlp(w_i, h_TxD, cfg.activation)
    if cfg.shared_width:
        s_TxD = _jnp_mlp(params["shared"], h_TxD, cfg.activation)
        if cfg.shared_gate:
            s_TxD = s_TxD * jax.nn.sigmoid(h_TxD @ params["shared_gate"]["kernel"])
        out = out + s_TxD
    return out


def _ref_chain(cfg, params, x_TxD, routes):
    """Hand-unrolled chain: x_{c+1} = x_c + m_c; "prenorm" -> sum m_c, "coe" -> x_0 + sum m_c."""
    h, total = x_TxD, None
    for step, route in enumerate(routes):
        m = _ref_step(cfg, params, h, step, route)
        total = m if total is None else total + m
        h = h + m
    return x_TxD + total if cfg.chain_residual == "coe" else total


def _np_act(h, activation: str):
    if activation == "gelu":
        return 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    if activation == "relu":
        return np.maximum(h, 0.0)
    raise ValueError(activation)


def _np_mlp(w: dict, x_D: np.ndarray, activation: str, e=None) -> np.ndarray:
    """One expert MLP on one token in float64 (`e` indexes the routed experts; None: shared)."""

    def get(name):
        return np.asarray(w[name] if e is None else w[name][e], np.float64)

    if activation == "swiglu":
        g = x_D @ get("w_gate")
        h = g / (1.0 + np.exp(-g)) * (x_D @ get("w_up"))
    else:
        h = _np_act(x_D @ get("w_up"), activation)
    return h @ get("w_down")


def _np_step(cfg, params, h_TxD: np.ndarray, route: dict) -> np.ndarray:
    """One MoE pass in float64 NumPy, per token and slot, with the reference routers' weights."""
    out = np.zeros_like(h_TxD)
    for t in range(h_TxD.shape[0]):
        for j in range(route["ids"].shape[1]):
            if route["kept"][t, j]:
                e = int(route["ids"][t, j])
                out[t] += route["weights"][t, j] * _np_mlp(
                    params["experts"], h_TxD[t], cfg.activation, e
                )
        if cfg.shared_width:
            s_D = _np_mlp(params["shared"], h_TxD[t], cfg.activation)
            if cfg.shared_gate:
                gate = h_TxD[t] @ np.asarray(params["shared_gate"]["kernel"], np.float64)[:, 0]
                s_D = s_D / (1.0 + np.exp(-gate))
            out[t] += s_D
    return out


def _reference(cfg: jmoe.MoEConfig, variables, x, budget: float = 0.0):
    """Reference routes (one per chain step, ids fixed), the float64 output and the differentiable
    (jnp) reference layer for gradients."""
    params = variables["params"]
    bias = variables.get("moe_state", {}).get("bias", np.zeros((cfg.chain_steps, cfg.num_experts)))
    bias = np.asarray(bias, np.float64).reshape(cfg.chain_steps, -1)
    x_TxD = np.asarray(x, np.float64).reshape(-1, cfg.d_model)
    t = x_TxD.shape[0]
    h, total, routes = x_TxD, 0.0, []
    for step in range(cfg.chain_steps):
        kernel = np.asarray(_kernel(params, step, cfg.chain_steps), np.float64)
        route = _route_ref(cfg, h @ kernel, bias[step], budget)
        route["kept"] = _kept_ref(cfg, route, t)
        routes.append(route)
        m = _np_step(cfg, params, h, route)
        total = total + m
        h = h + m
    y = x_TxD + total if cfg.chain_residual == "coe" else total

    def fn(params, x):
        return _ref_chain(cfg, params, x.reshape(-1, cfg.d_model), routes).reshape(x.shape)

    return routes, y.reshape(np.shape(x)), fn


def _init(rng, shape):
    """Fan-in scaled normal weights (the fan-in is the second-to-last axis)."""
    return jnp.asarray(rng.normal(size=shape) / math.sqrt(shape[-2]), jnp.float32)


def _setup(cfg, seed, x_shape=(B, S), router_scale=2.0, budget=None, accept=None, tries=40):
    """Random input and variables (router kernel scaled for sharper routing) with tie-free routing.

    Tries seeds from `seed` until every reference decision is `MARGIN` away from a tie or threshold
    and `accept(routes)` holds. Returns x, variables, routes, the float64 output, the jnp layer.
    """
    shapes = jax.eval_shape(jmoe.MoE(cfg).init, jax.random.key(0), jnp.zeros((*x_shape, D)))
    for s in range(seed, seed + tries):
        rng = np.random.default_rng(s)
        x = jnp.asarray(rng.normal(size=(*x_shape, cfg.d_model)), jnp.float32)
        params = jax.tree.map(lambda a: _init(rng, a.shape), shapes["params"])
        params["router"]["kernel"] = params["router"]["kernel"] * router_scale
        state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes.get("moe_state", {}))
        if "budget" in state:
            state["budget"] = jnp.float32(0.0 if budget is None else budget)
        variables = {"params": params, **({"moe_state": state} if state else {})}
        routes, y, fn = _reference(cfg, variables, x, 0.0 if budget is None else budget)
        if min(r["margin"] for r in routes) > MARGIN and (accept is None or accept(routes)):
            return x, variables, routes, y, fn
    raise AssertionError(f"no tie-free seed in [{seed}, {seed + tries}) for {cfg}")


def _ref_stats(cfg: jmoe.MoEConfig, routes, token_mask=None) -> dict:
    """Expected layer statistics from the reference routes (docs/algorithms.md)."""
    t = routes[0]["ids"].shape[0]
    mask = np.ones(t, bool) if token_mask is None else np.asarray(token_mask, bool).reshape(t)
    lb, z, ent, loads, dropped = 0.0, 0.0, 0.0, [], []
    for r in routes:
        if cfg.router.kind == "null_experts":
            lb += ref.ref_load_balance_null(
                r["choices"],
                r["probs"],
                cfg.num_experts,
                cfg.router.num_null,
                cfg.lb_normalization,
                cfg.router.null_balance,
                token_mask=mask,
            )
        elif (
            cfg.router.kind != "expert_choice"
        ):  # expert choice has no auxiliary loss (docs/algorithms.md)
            lb += ref.ref_load_balance(
                r["ids"], r["valid"], r["probs"], cfg.num_experts, cfg.lb_normalization, mask
            )
        z += ref.ref_z_loss(r["logits"], mask)
        ent += ref.ref_entropy(r["probs"], mask)
        counts = np.zeros(cfg.num_experts)
        for tok in np.flatnonzero(mask):
            for e, v in zip(r["ids"][tok], r["valid"][tok]):
                if v:
                    counts[e] += 1
        loads.append(counts)
        dropped.append(1.0 - r["kept"].sum() / max(r["valid"].sum(), 1))
    active_T = sum(r["kept"].sum(-1) for r in routes)
    active = active_T[mask].mean()
    bins = cfg.slots * cfg.chain_steps + 1
    hist = np.array([(active_T[mask] == n).mean() for n in range(bins)])
    n_mats = 3 if cfg.activation == "swiglu" else 2
    flops = 2 * D * cfg.d_ff * n_mats * active + 2 * D * cfg.shared_width * n_mats * cfg.chain_steps
    aux = cfg.lb_coef * lb + cfg.z_loss_coef * z + cfg.entropy_coef * ent
    return dict(
        load_balance_loss=lb,
        z_loss=z,
        entropy=ent,
        aux_loss=aux,
        tokens_per_expert=loads[0] if len(loads) == 1 else np.stack(loads),
        dropped_fraction=np.mean(dropped),
        active_experts=active,
        active_experts_hist=hist,
        expert_flops_per_token=flops,
        active_T=active_T,
    )


def _check_stats(stats, want, check_dropped=True):
    for key in ("load_balance_loss", "z_loss", "entropy", "aux_loss", "expert_flops_per_token"):
        np.testing.assert_allclose(stats[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(stats["tokens_per_expert"], want["tokens_per_expert"])
    np.testing.assert_allclose(stats["active_experts"], want["active_experts"], rtol=1e-6)
    assert stats["active_experts_hist"].shape == want["active_experts_hist"].shape
    np.testing.assert_allclose(stats["active_experts_hist"], want["active_experts_hist"], atol=1e-7)
    if check_dropped:
        np.testing.assert_allclose(
            stats["dropped_fraction"], want["dropped_fraction"], rtol=1e-6, atol=1e-7
        )


def _apply_and_grad(model, variables, x, ct):
    """One jitted jmoe call: output, stats and the gradients of sum(y * ct) w.r.t. (params, x)."""

    def loss(params, x):
        y, stats = model.apply({**variables, "params": params}, x)
        return jnp.sum(y * ct), (y, stats)

    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
        variables["params"], x
    )
    return y, stats, grads


def _check_layer(cfg, variables, x, routes, want_y, ref_fn, rtol=GRAD_RTOL, atol=GRAD_ATOL):
    """jmoe output, stats and gradients (params and input) against the reference."""
    model = jmoe.MoE(cfg)
    ct = jax.random.normal(jax.random.key(7), x.shape)
    y, stats, grads = _apply_and_grad(model, variables, x, ct)
    np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=ATOL)
    _check_stats(stats, _ref_stats(cfg, routes))
    ref_loss = jax.value_and_grad(lambda p, x: jnp.sum(ref_fn(p, x) * ct), (0, 1))
    ref_y, want = jax.jit(lambda p, x: (ref_fn(p, x), ref_loss(p, x)[1]))(variables["params"], x)
    np.testing.assert_allclose(ref_y, want_y, rtol=RTOL, atol=ATOL)  # the two references agree
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    for path, g, w in zip(paths, jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        assert np.isfinite(np.asarray(g)).all(), path
        assert np.abs(np.asarray(w)).sum() > 0, f"reference gradient of {path} is all zero"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=path)
    return np.asarray(y).reshape(-1, cfg.d_model), stats, grads


# ====================================================== 1. adaptive routers vs the reference

ROUTER_CASES = {
    # AdaMoE (docs/algorithms.md): num_null 1-4, k 2-4.
    "null_m1_k2": dict(num_experts=4, router=jmoe.NullExperts(num_null=1, k=2)),
    "null_m2_k3_shared": dict(
        num_experts=4, num_shared=1, router=jmoe.NullExperts(num_null=2, k=3)
    ),
    "null_m4_k2": dict(num_experts=4, router=jmoe.NullExperts(num_null=4, k=2)),
    "null_m3_k4": dict(num_experts=6, z_loss_coef=1e-3, router=jmoe.NullExperts(num_null=3, k=4)),
    # Dynamic top-p (docs/algorithms.md), with the paper's entropy ("dynamic") loss in one case.
    "top_p_strict": dict(num_experts=6, entropy_coef=1e-2, router=jmoe.TopP(p=0.5)),
    "top_p_inclusive": dict(num_experts=6, router=jmoe.TopP(p=0.7, boundary="inclusive")),
    "top_p_strict_max_k2": dict(num_experts=6, router=jmoe.TopP(p=0.8, max_k=2)),
    "top_p_inclusive_max_k3_shared": dict(
        num_experts=5, num_shared=1, router=jmoe.TopP(p=0.6, max_k=3, boundary="inclusive")
    ),
    # Expert choice: capacity = round(cf * T / E), the router's capacity factor (default 2).
    "expert_choice": dict(num_experts=4, router=jmoe.ExpertChoice(allow_noncausal=True)),
}
# Every variant runs with both implementations, dropless and with a capacity (outputs and stats).
# Gradients are compared for the combinations listed here: each router family gets its gradients
# checked under all four (implementation, capacity) combinations, expert choice under two.
GRAD_COMBOS = {
    "null_m1_k2": [("xla", False)],
    "null_m2_k3_shared": [("ragged_dot", True)],
    "null_m4_k2": [("ragged_dot", False)],
    "null_m3_k4": [("xla", True)],
    "top_p_strict": [("ragged_dot", True)],
    "top_p_inclusive": [("ragged_dot", False)],
    "top_p_strict_max_k2": [("xla", True)],
    "top_p_inclusive_max_k3_shared": [("xla", False)],
    "expert_choice": [("xla", False), ("ragged_dot", True)],
}
ROUTER_PARAMS = [
    pytest.param(name, impl, dropping, id=f"{name}-{impl}-{'capacity' if dropping else 'dropless'}")
    for name in ROUTER_CASES
    for impl in ("xla", "ragged_dot")
    for dropping in (False, True)
]


@pytest.mark.parametrize("name,impl,dropping", ROUTER_PARAMS)
def test_adaptive_router_layer_matches_reference(name, impl, dropping):
    kw = dict(ROUTER_CASES[name])
    if dropping and kw["router"].kind == "expert_choice":  # fewer tokens per expert
        kw["router"] = dataclasses.replace(kw["router"], capacity_factor=1.25)
    elif dropping:  # a capacity of 0.6 x 2 slots per token, for every router's slot count K
        kw["capacity_factor"] = 0.6 * 2 / kw["router"].slots(kw["num_experts"])
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, implementation=impl, **kw)
    t = B * S

    def accept(routes):
        r = routes[0]
        n_valid = r["valid"].sum(-1)
        ok = len(set(n_valid.tolist())) >= 2  # per-token counts vary
        if cfg.router.kind == "null_experts" and cfg.router.num_null >= cfg.router.k:
            ok = ok and (n_valid == 0).any()  # some tokens pick only null experts
        if cfg.router.kind == "expert_choice" and dropping:
            ok = ok and (n_valid == 0).any()  # some tokens get no expert at all
        if dropping and cfg.router.kind != "expert_choice":
            ok = ok and (r["kept"] != r["valid"]).any()  # the capacity does drop something
        return ok

    seed = 100 * list(ROUTER_CASES).index(name) + 10 * dropping
    x, variables, routes, want_y, ref_fn = _setup(cfg, seed=seed, accept=accept)
    grads = None
    if (impl, dropping) in GRAD_COMBOS[name]:
        y, stats, grads = _check_layer(cfg, variables, x, routes, want_y, ref_fn)
    else:
        y, stats = jax.jit(jmoe.MoE(cfg).apply)(variables, x)
        np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=ATOL)
        _check_stats(stats, _ref_stats(cfg, routes))
        y = np.asarray(y).reshape(t, D)

    assert float(stats["seq_balance_loss"]) == 0.0  # DeepSeek-V3 sequence loss: top_k only
    if cfg.router.kind == "expert_choice":
        capacity = cfg.router.capacity(t, cfg.num_experts, deterministic=True)
        assert capacity == round(cfg.router.capacity_factor * t / 4)
        np.testing.assert_array_equal(stats["tokens_per_expert"], capacity)
    # Tokens without any kept computation get exactly zero routed output, and nothing depends on
    # their input: its gradient is exactly zero, not NaN (no shared expert in these cases).
    idle = ~routes[0]["kept"].any(-1)
    if cfg.shared_width == 0 and idle.any():
        assert (y[idle] == 0.0).all()
        if grads is not None:
            assert (np.asarray(grads[1]).reshape(t, D)[idle] == 0.0).all()


def test_all_null_tokens_zero_output_and_finite_gradients():
    """A budget offset pushes many tokens to all-null picks (num_null >= k): exact zeros, no NaN."""
    cfg = jmoe.MoEConfig(
        d_model=D,
        d_ff=F,
        num_experts=4,
        implementation="xla",
        router=jmoe.NullExperts(num_null=4, k=3, target_active_experts=1.0),
    )

    def accept(routes):
        n_valid = routes[0]["valid"].sum(-1)
        return (n_valid == 0).sum() >= 4 and (n_valid > 0).sum() >= 4

    x, variables, routes, want_y, ref_fn = _setup(cfg, seed=11, budget=1.5, accept=accept)
    y, stats, grads = _check_layer(cfg, variables, x, routes, want_y, ref_fn)
    all_null = ~routes[0]["valid"].any(-1)
    assert (y[all_null] == 0.0).all()
    assert (np.abs(y[~all_null]).sum(-1) > 0).all()
    assert float(stats["active_experts_hist"][0]) == pytest.approx(all_null.mean())
    assert (np.asarray(grads[1]).reshape(-1, D)[all_null] == 0.0).all()


@pytest.mark.parametrize(
    "kw,budget",
    [
        (
            dict(
                num_experts=4, router=jmoe.NullExperts(num_null=3, k=3, target_active_experts=1.5)
            ),
            -0.7,
        ),
        (dict(num_experts=6, router=jmoe.TopP(p=0.5, target_active_experts=2.0)), 0.2),
        (dict(num_experts=6, router=jmoe.TopP(p=0.5, target_active_experts=2.0)), -0.3),
    ],
    ids=["null_offset", "top_p_cut", "top_p_raise"],
)
def test_budget_state_moves_the_selection(kw, budget):
    """`moe_state/budget` is the null logit offset / the top-p threshold cut (p - budget)."""
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, **kw)
    x, variables, routes, want_y, _ = _setup(cfg, seed=21, budget=budget)
    assert variables["moe_state"]["budget"].shape == ()
    apply = jax.jit(jmoe.MoE(cfg).apply)
    y, stats = apply(variables, x)
    np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=ATOL)
    _check_stats(stats, _ref_stats(cfg, routes))
    # The budget changed the decision compared with budget 0, in the right direction.
    no_budget = {**variables, "moe_state": {**variables["moe_state"], "budget": jnp.float32(0)}}
    _, stats0 = apply(no_budget, x)
    moved = float(stats["active_experts"]) - float(stats0["active_experts"])
    assert moved * budget < 0, (moved, budget)  # positive budget -> fewer experts


# ============================================================================ 2. chain of experts

CHAIN_ROUTERS = {
    "top_k": dict(num_experts=4, router=jmoe.TopK(k=2)),
    "null": dict(num_experts=4, router=jmoe.NullExperts(num_null=2, k=2)),
    "top_p": dict(num_experts=5, router=jmoe.TopP(p=0.6, max_k=3)),
}


@pytest.mark.parametrize("name", list(CHAIN_ROUTERS))
def test_chain_of_one_step_is_the_plain_moe(name):
    plain = jmoe.MoEConfig(d_model=D, d_ff=F, num_shared=1, **CHAIN_ROUTERS[name])
    prenorm = dataclasses.replace(plain, chain_steps=1, chain_residual="prenorm")
    coe = dataclasses.replace(plain, chain_steps=1, chain_residual="coe")
    x, variables, _, want_y, _ = _setup(plain, seed=31)
    for c in (prenorm, coe):
        shapes = jax.eval_shape(jmoe.MoE(c).init, jax.random.key(0), x)
        assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, variables)
    assert variables["params"]["router"]["kernel"].shape == (D, plain.num_router_outputs)
    if plain.router.kind == "top_k":
        assert variables["moe_state"]["bias"].shape == (plain.num_experts,)
    (y0, s0), (y1, s1), (y2, s2) = jax.jit(
        lambda v, x: [jmoe.MoE(c).apply(v, x) for c in (plain, prenorm, coe)]
    )(variables, x)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(y2, x + y0)
    for key in s0:
        np.testing.assert_array_equal(s1[key], s0[key], err_msg=key)
        np.testing.assert_array_equal(s2[key], s0[key], err_msg=key)
    np.testing.assert_allclose(y0, want_y, rtol=RTOL, atol=ATOL)


CHAIN_CASES = {
    "top_k_c2_prenorm_shared": (dict(CHAIN_ROUTERS["top_k"], num_shared=1), 2, "prenorm", "xla"),
    "top_k_c2_coe_capacity": (
        dict(CHAIN_ROUTERS["top_k"], capacity_factor=0.75),
        2,
        "coe",
        "ragged_dot",
    ),
    "null_c2_coe_shared": (dict(CHAIN_ROUTERS["null"], d_ff_shared=12), 2, "coe", "xla"),
    "null_c2_prenorm": (CHAIN_ROUTERS["null"], 2, "prenorm", "ragged_dot"),
    "top_p_c2_prenorm_shared": (dict(CHAIN_ROUTERS["top_p"], num_shared=1), 2, "prenorm", "xla"),
    "top_p_c3_coe_gelu": (dict(CHAIN_ROUTERS["top_p"], activation="gelu"), 3, "coe", "xla"),
    "null_c1_coe": (CHAIN_ROUTERS["null"], 1, "coe", "xla"),
}


@pytest.mark.parametrize("name", list(CHAIN_CASES))
def test_chain_matches_unrolled_reference(name):
    kw, c, residual, impl = CHAIN_CASES[name]
    cfg = jmoe.MoEConfig(
        d_model=D, d_ff=F, chain_steps=c, chain_residual=residual, implementation=impl, **kw
    )

    def accept(routes):
        steps_differ = c == 1 or not np.array_equal(routes[0]["ids"], routes[1]["ids"])
        drops = cfg.capacity_factor is None or any((r["kept"] != r["valid"]).any() for r in routes)
        return steps_differ and drops

    seed = 200 + 10 * list(CHAIN_CASES).index(name)
    x, variables, routes, want_y, ref_fn = _setup(cfg, seed=seed, accept=accept)
    e_all = cfg.num_router_outputs
    want_kernel = (D, e_all) if c == 1 else (c, D, e_all)
    want_loads = (cfg.num_experts,) if c == 1 else (c, cfg.num_experts)
    assert variables["params"]["router"]["kernel"].shape == want_kernel
    if cfg.router.kind == "top_k":
        assert variables["moe_state"]["bias"].shape == want_loads
    assert variables["params"]["experts"]["w_down"].shape == (cfg.num_experts, F, D)  # one set

    _, stats, _ = _check_layer(cfg, variables, x, routes, want_y, ref_fn, rtol=2e-4, atol=2e-5)
    assert stats["tokens_per_expert"].shape == want_loads
    if c > 1:
        # The loss is the SUM of the per-step losses, not their mean or the last step's.
        one_step = dataclasses.replace(cfg, chain_steps=1)
        per_step = [_ref_stats(one_step, [r])["load_balance_loss"] for r in routes]
        np.testing.assert_allclose(stats["load_balance_loss"], sum(per_step), rtol=1e-5)
        assert min(per_step) > 0.1 * max(per_step)


# ====================================================================== 3. compute accounting

ACCOUNTING_CASES = {
    "null_swiglu_shared": dict(
        num_experts=4, num_shared=1, router=jmoe.NullExperts(num_null=3, k=3)
    ),
    "top_p_gelu_capacity_shared": dict(
        num_experts=5,
        activation="gelu",
        d_ff_shared=12,
        capacity_factor=0.6,
        router=jmoe.TopP(p=0.6),
    ),
    "expert_choice_relu": dict(
        num_experts=4, activation="relu", router=jmoe.ExpertChoice(allow_noncausal=True)
    ),
    "null_chain2_relu_shared": dict(
        num_experts=4,
        chain_steps=2,
        activation="relu",
        num_shared=2,
        router=jmoe.NullExperts(num_null=2, k=2),
    ),
    "top_k_chain3_capacity": dict(
        num_experts=4, chain_steps=3, capacity_factor=0.75, router=jmoe.TopK(k=2)
    ),
}


@pytest.mark.parametrize("name", list(ACCOUNTING_CASES))
def test_compute_accounting_with_token_mask(name):
    """active_experts / hist / FLOPs count the kept expert computations of the unmasked tokens."""
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, **ACCOUNTING_CASES[name])
    mask = np.ones((B, S), bool)
    mask[0, 0] = False
    mask[1, 5:] = False
    m = mask.reshape(-1)

    def accept(routes):
        active_T = sum(r["kept"].sum(-1) for r in routes)
        # Per-token counts vary, and the mask matters for this input.
        return len(set(active_T[m].tolist())) >= 2 and active_T[m].mean() != active_T.mean()

    seed = 300 + 10 * list(ACCOUNTING_CASES).index(name)
    x, variables, routes, want_y, _ = _setup(cfg, seed=seed, accept=accept)
    apply = jax.jit(lambda v, x, m: jmoe.MoE(cfg).apply(v, x, token_mask=m))
    y, stats = apply(variables, x, jnp.asarray(mask))
    y_all, stats_all = apply(variables, x, jnp.ones((B, S), bool))
    np.testing.assert_array_equal(y, y_all)  # the mask changes the statistics only
    np.testing.assert_allclose(y, want_y, rtol=RTOL, atol=ATOL)
    want = _ref_stats(cfg, routes, mask)
    _check_stats(stats, want, check_dropped=False)
    _check_stats(stats_all, _ref_stats(cfg, routes))

    active_T = want["active_T"]
    hist = np.asarray(stats["active_experts_hist"])
    assert hist.shape == (cfg.slots * cfg.chain_steps + 1,)
    np.testing.assert_allclose(hist.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(hist @ np.arange(hist.size), stats["active_experts"], rtol=1e-5)
    n_mats = 3 if cfg.activation == "swiglu" else 2
    flops = 2 * D * n_mats * (F * active_T[m].mean() + cfg.shared_width * cfg.chain_steps)
    np.testing.assert_allclose(stats["expert_flops_per_token"], flops, rtol=1e-6)


# ================================================================= 4. compute-budget controller

BUDGET_CASES = {
    "null_fewer": dict(
        router=jmoe.NullExperts(num_null=8, k=4, target_active_experts=1.0, budget_rate=0.2)
    ),
    "null_more": dict(
        router=jmoe.NullExperts(num_null=8, k=4, target_active_experts=3.0, budget_rate=0.2)
    ),
    "top_p_fewer": dict(router=jmoe.TopP(target_active_experts=1.2, budget_rate=0.1)),
    "top_p_more": dict(router=jmoe.TopP(target_active_experts=3.0, budget_rate=0.1)),
}


@pytest.mark.parametrize("name", list(BUDGET_CASES))
def test_budget_controller_converges_to_the_target(name):
    """Fixed params and input; only `moe_state` evolves through `update_state`."""
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, num_experts=8, **BUDGET_CASES[name])
    target, steps = cfg.router.target_active_experts, 150
    rng = np.random.default_rng(400)
    x = jnp.asarray(rng.normal(size=(256, D)), jnp.float32)
    shapes = jax.eval_shape(jmoe.MoE(cfg).init, jax.random.key(0), x)
    params = jax.tree.map(lambda a: _init(rng, a.shape), shapes["params"])
    state = {"budget": jnp.float32(0.0)}
    assert set(shapes["moe_state"]) == set(state) and shapes["moe_state"]["budget"].shape == ()

    apply = jax.jit(lambda s: jmoe.MoE(cfg).apply({"params": params, "moe_state": s}, x)[1])
    update = jax.jit(lambda s, st: update_state(cfg, s, st))
    active, hist = [], None
    for _ in range(steps):
        stats = apply(state)
        active.append(float(stats["active_experts"]))
        new = update(state, stats)
        assert set(new) == set(state)
        np.testing.assert_allclose(
            new["budget"],
            state["budget"] + cfg.router.budget_rate * (active[-1] - target),
            rtol=1e-6,
            atol=1e-7,
        )
        state, hist = new, np.asarray(stats["active_experts_hist"])
    active = np.asarray(active)
    assert abs(active[0] - target) > 0.5, active[0]  # the controller has work to do
    assert abs(active[-20:].mean() - target) < 0.1, active[-20:]
    assert np.abs(active[-20:] - target).max() < 0.3, active[-20:]
    # Above the target the pressure (budget) rises, below it falls.
    assert np.sign(float(state["budget"])) == np.sign(active[0] - target)
    # Tokens still differ: the controller fixes the mean, not every token's count.
    assert (hist > 0).sum() >= 2, hist


def test_update_state_bias_of_a_chain_and_budget_step():
    cfg = jmoe.MoEConfig(
        d_model=D, d_ff=F, num_experts=4, chain_steps=2, router=jmoe.TopK(k=2, bias_update_rate=0.1)
    )
    bias = jnp.asarray([[0.0, 0.1, 0.2, 0.3], [1.0, 0.0, 0.0, 0.0]])
    loads = jnp.asarray([[5.0, 1.0, 1.0, 1.0], [2.0, 2.0, 3.0, 1.0]])
    new = update_state(cfg, {"bias": bias}, {"tokens_per_expert": loads})
    np.testing.assert_allclose(
        new["bias"], [[-0.1, 0.2, 0.3, 0.4], [1.0, 0.0, -0.1, 0.1]], rtol=1e-6
    )
    cfg = jmoe.MoEConfig(
        d_model=D,
        d_ff=F,
        num_experts=4,
        router=jmoe.TopP(target_active_experts=1.5, budget_rate=0.5),
    )
    state = {"bias": jnp.zeros(4), "budget": jnp.float32(0.25)}
    new = update_state(cfg, state, {"active_experts": jnp.float32(2.5)})
    np.testing.assert_allclose(new["budget"], 0.75, rtol=1e-6)
    np.testing.assert_array_equal(new["bias"], state["bias"])


# ======================================================================= 5. config validation

BAD_CONFIGS = [
    (lambda: dict(router=jmoe.TopP(p=0.0)), "TopP.p=0.0"),
    (lambda: dict(router=jmoe.TopP(p=1.5)), "TopP.p=1.5"),
    (lambda: dict(router=jmoe.TopP(p=-0.2)), "TopP.p=-0.2"),
    (lambda: dict(router=jmoe.NullExperts(num_null=-1)), "NullExperts.num_null=-1"),
    (lambda: dict(router=jmoe.NullExperts(num_null=0)), "NullExperts.num_null=0"),
    (lambda: dict(chain_steps=0), "chain_steps=0"),
    (lambda: dict(chain_steps=-2), "chain_steps=-2"),
    (lambda: dict(num_experts=4, router=jmoe.TopP(max_k=5)), "TopP.max_k=5"),
    (lambda: dict(num_experts=4, router=jmoe.TopP(max_k=0)), "TopP.max_k=0"),
    (lambda: dict(router=jmoe.ExpertChoice()), "ExpertChoice.allow_noncausal=False"),
    (
        lambda: dict(router=jmoe.NullExperts(num_null=2, k=2, target_active_experts=2.5)),
        "NullExperts.target_active_experts=2.5",
    ),
    (
        lambda: dict(router=jmoe.NullExperts(num_null=2, k=2, target_active_experts=0.0)),
        "NullExperts.target_active_experts=0.0",
    ),
    (lambda: dict(chain_residual="residual"), "chain_residual='residual'"),
    (lambda: dict(chain_residual=None), "chain_residual=None"),
    (lambda: dict(router=jmoe.NullExperts(num_null=2, budget_rate=-0.1)), "budget_rate=-0.1"),
    (lambda: dict(router=jmoe.TopP(boundary="exclusive")), "TopP.boundary='exclusive'"),
    (
        lambda: dict(router=jmoe.NullExperts(num_null=2, null_balance="pooled")),
        "NullExperts.null_balance='pooled'",
    ),
    (lambda: dict(router="adaptive"), "router='adaptive'"),
]


@pytest.mark.parametrize("kw,named", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_bad_adaptive_config_raises_naming_field_and_value(kw, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        jmoe.MoEConfig(d_model=D, d_ff=F, **kw())


def test_settings_of_another_router_cannot_be_written():
    """A budget, null experts or a bias rate belong to the routers that use them."""
    for build, field in [
        (lambda: jmoe.TopK(target_active_experts=2.0), "target_active_experts"),
        (lambda: jmoe.TopK(num_null=2), "num_null"),
        (lambda: jmoe.TopP(num_null=1), "num_null"),
        (lambda: jmoe.ExpertChoice(allow_noncausal=True, target_active_experts=1.0), "target"),
    ]:
        with pytest.raises(TypeError, match=field):
            build()


@pytest.mark.parametrize(
    "kw",
    [
        dict(router=jmoe.TopP(p=1.0)),
        dict(router=jmoe.TopP(p=1e-3, boundary="inclusive")),
        dict(num_experts=4, router=jmoe.TopP(max_k=4)),
        dict(num_experts=4, router=jmoe.TopP(max_k=1)),
        dict(router=jmoe.NullExperts(num_null=4, k=12)),
        dict(router=jmoe.ExpertChoice(allow_noncausal=True)),
        dict(chain_steps=1, chain_residual="coe"),
        dict(chain_steps=3, router=jmoe.NullExperts(num_null=2, k=2, target_active_experts=6.0)),
        dict(num_experts=4, chain_steps=2, router=jmoe.TopP(max_k=2, target_active_experts=4.0)),
        dict(router=jmoe.TopP(target_active_experts=8.0, budget_rate=0.0)),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_valid_adaptive_configs_are_accepted(kw):
    cfg = jmoe.MoEConfig(d_model=D, d_ff=F, **kw)
    for key, value in kw.items():
        assert getattr(cfg, key) == value
