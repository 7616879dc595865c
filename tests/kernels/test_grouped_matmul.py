"""Tests of `jmoe.kernels` (the API and its XLA tiled loop): grouped matmul and expert MLP against
NumPy per-group loops.

Every reference here is float64 NumPy written group by group, with gradients derived by hand, so
nothing is compared against jmoe itself.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shape_cases

from jmoe import kernels
from jmoe.kernels import xla_tiled as tiled

M, G, K, N = 32, 4, 8, 6  # rows, groups, in width, out width
D, F = 8, 12  # expert MLP widths
IMPLS = ("xla", "ragged_dot", None)
GS_CASES = shape_cases.group_size_cases(M, G)
TILES = (3, 4, 8, 64)  # smaller than, equal to, larger than the groups; one not a power of two


# ------------------------------------------------------------------------------ NumPy references


def _group_bounds(gs):
    ends = np.cumsum(gs)
    return list(zip(ends - gs, ends, strict=True))


def ref_gmm(x, w, gs, ct):
    """Forward and hand-derived gradients of `sum(y * ct)` in float64, one group at a time."""
    x, w, ct = (np.asarray(a, np.float64) for a in (x, w, ct))
    y = np.zeros((x.shape[0], w.shape[2]))
    dx = np.zeros_like(x)
    dw = np.zeros_like(w)
    for g, (s, e) in enumerate(_group_bounds(gs)):
        y[s:e] = x[s:e] @ w[g]
        dx[s:e] = ct[s:e] @ w[g].T
        dw[g] = x[s:e].T @ ct[s:e]
    return y, dx, dw


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _act(name, pre):
    """Activation value and its derivative(s) w.r.t. each pre-activation (float64)."""
    if name == "swiglu":
        g, u = pre
        s = 1.0 / (1.0 + np.exp(-g))
        silu = g * s
        return silu * u, (u * (s + g * s * (1.0 - s)), silu)
    (u,) = pre
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(u / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
        return u * cdf, (cdf + u * pdf,)
    if name == "relu":
        return np.maximum(u, 0.0), ((u > 0).astype(np.float64),)
    raise AssertionError(name)


def ref_mlp(x, w_in, w_down, gs, activation, ct):
    """Per-group expert MLP forward and hand-written backprop of `sum(y * ct)` (float64)."""
    x, w_down, ct = (np.asarray(a, np.float64) for a in (x, w_down, ct))
    w_in = [np.asarray(a, np.float64) for a in w_in]
    y = np.zeros((x.shape[0], w_down.shape[2]))
    dx = np.zeros_like(x)
    dw_in = [np.zeros_like(a) for a in w_in]
    dw_down = np.zeros_like(w_down)
    for g, (s, e) in enumerate(_group_bounds(gs)):
        xg, cg = x[s:e], ct[s:e]
        pre = [xg @ a[g] for a in w_in]
        h, dacts = _act(activation, pre)
        y[s:e] = h @ w_down[g]
        dh = cg @ w_down[g].T
        dw_down[g] = h.T @ cg
        for i, (a, da) in enumerate(zip(w_in, dacts, strict=True)):
            dpre = dh * da
            dx[s:e] += dpre @ a[g].T
            dw_in[i][g] = xg.T @ dpre
    return y, dx, dw_in, dw_down


# ------------------------------------------------------------------------------ helpers


def _inputs(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _close(actual, expected, rtol=1e-5, atol=1e-5, err_msg=""):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol * scale, err_msg=err_msg
    )


def _used(gs):
    return int(np.sum(gs))


@pytest.fixture(scope="module")
def gmm_fns():
    """jitted `(y, dx, dw)` of `sum(y * ct)` per (implementation, tile); compiled once each."""
    cache = {}

    def get(impl=None, tile=None, use_tiled=False):
        key = (impl, tile, use_tiled)
        if key not in cache:
            if use_tiled:
                f = lambda x, w, gs: tiled.grouped_matmul(x, w, gs, tile=tile)  # noqa: E731
            else:
                f = lambda x, w, gs: kernels.grouped_matmul(x, w, gs, implementation=impl)  # noqa: E731

            @jax.jit
            def run(x, w, gs, ct):
                y, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
                return (y, *vjp(ct))

            cache[key] = run
        return cache[key]

    return get


@pytest.fixture(scope="module")
def mlp_fns():
    cache = {}

    def get(activation, impl=None, tile=None, use_tiled=False):
        key = (activation, impl, tile, use_tiled)
        if key not in cache:
            if use_tiled:

                def f(x, w_in, w_down, gs):
                    return tiled.expert_mlp(x, w_in, w_down, gs, activation, tile=tile)
            else:

                def f(x, w_in, w_down, gs):
                    return kernels.expert_mlp(
                        x, w_in, w_down, gs, activation=activation, implementation=impl
                    )

            @jax.jit
            def run(x, w_in, w_down, gs, ct):
                y, vjp = jax.vjp(lambda x, w_in, w_down: f(x, w_in, w_down, gs), x, w_in, w_down)
                return (y, *vjp(ct))

            cache[key] = run
        return cache[key]

    return get


def _check_gmm(run, gs, seed=0):
    x, w, ct = _inputs(seed, (M, K), (G, K, N), (M, N))
    y, dx, dw = run(x, w, jnp.asarray(gs), ct)
    ry, rdx, rdw = ref_gmm(x, w, gs, ct)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    assert dx.shape == x.shape and dw.shape == w.shape
    _close(y, ry, err_msg="forward")
    _close(dx, rdx, err_msg="dx")
    _close(dw, rdw, err_msg="dw")
    s = _used(gs)
    np.testing.assert_array_equal(np.asarray(y)[s:], 0.0)  # exactly zero past the groups
    np.testing.assert_array_equal(np.asarray(dx)[s:], 0.0)
    for g in np.flatnonzero(np.asarray(gs) == 0):
        np.testing.assert_array_equal(np.asarray(dw)[g], 0.0)


# ------------------------------------------------------------------------------ grouped_matmul


def test_catalogue_covers_the_edge_cases():
    """The cases this file relies on really are what their names say."""
    assert GS_CASES["ragged_tail"].sum() < M and GS_CASES["ragged_tail"][1] == 0
    assert GS_CASES["all_unused"].sum() == 0
    assert (GS_CASES["empty_groups"] == 0).any()
    assert all(gs.sum() <= M and gs.dtype == np.int32 for gs in GS_CASES.values())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(GS_CASES))
def test_grouped_matmul_matches_per_group_loop(gmm_fns, impl, case):
    _check_gmm(gmm_fns(impl=impl), GS_CASES[case], seed=1)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("case", list(GS_CASES))
def test_tiled_grouped_matmul_any_tile(gmm_fns, tile, case):
    _check_gmm(gmm_fns(tile=tile, use_tiled=True), GS_CASES[case], seed=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_matmul_random_group_sizes(gmm_fns, impl):
    rng = np.random.default_rng(3)
    run = gmm_fns(impl=impl)
    for i in range(4):
        used = int(rng.integers(0, M + 1))
        gs = rng.multinomial(used, np.ones(G) / G).astype(np.int32)
        _check_gmm(run, gs, seed=10 + i)


def test_grouped_matmul_docstring_example():
    x = jnp.ones((4, 2))
    w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
    for impl in IMPLS:
        y = kernels.grouped_matmul(x, w, jnp.array([1, 2]), implementation=impl)
        np.testing.assert_array_equal(np.asarray(y), [[1, 1], [2, 2], [2, 2], [0, 0]])


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_matmul_bfloat16_forward(impl):
    x, w = _inputs(4, (M, K), (G, K, N))
    gs = GS_CASES["ragged_tail"]
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y = jax.jit(lambda x, w, gs: kernels.grouped_matmul(x, w, gs, implementation=impl))(xb, wb, gs)
    assert y.dtype == jnp.bfloat16
    ry, _, _ = ref_gmm(x, w, gs, np.zeros((M, N)))
    _close(y, ry, **TOL[jnp.bfloat16])
    np.testing.assert_array_equal(np.asarray(y, np.float32)[_used(gs) :], 0.0)


@pytest.mark.parametrize("bad", ["pallas_typo", "XLA", "dense"])
def test_bad_implementation_name(bad):
    x, w = jnp.ones((4, 2)), jnp.ones((3, 2, 2))
    gs = jnp.array([1, 1, 1])
    with pytest.raises(ValueError, match=repr(bad)):
        kernels.grouped_matmul(x, w, gs, implementation=bad)
    with pytest.raises(ValueError, match=repr(bad)):
        kernels.expert_mlp(x, (w, w), w, gs, implementation=bad)


# ------------------------------------------------------------------------------ expert_mlp

ACTIVATIONS = ("swiglu", "gelu", "relu")
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def _mlp_inputs(seed, activation):
    n_in = 2 if activation == "swiglu" else 1
    x, *w_in, w_down, ct = _inputs(seed, (M, D), *[(G, D, F)] * n_in, (G, F, D), (M, D))
    w_in = [a / math.sqrt(D) for a in w_in]
    return x, tuple(w_in), w_down / math.sqrt(F), ct


def _check_mlp(run, activation, gs, seed=0):
    x, w_in, w_down, ct = _mlp_inputs(seed, activation)
    y, dx, dw_in, dw_down = run(x, w_in, w_down, jnp.asarray(gs), ct)
    ry, rdx, rdw_in, rdw_down = ref_mlp(x, w_in, w_down, gs, activation, ct)
    assert y.shape == (M, D) and y.dtype == jnp.float32
    _close(y, ry, err_msg="forward")
    _close(dx, rdx, err_msg="dx")
    assert len(dw_in) == len(rdw_in)
    for i, (a, b) in enumerate(zip(dw_in, rdw_in, strict=True)):
        _close(a, b, err_msg=f"dw_in[{i}]")
    _close(dw_down, rdw_down, err_msg="dw_down")
    s = _used(gs)
    np.testing.assert_array_equal(np.asarray(y)[s:], 0.0)
    np.testing.assert_array_equal(np.asarray(dx)[s:], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", list(GS_CASES))
def test_expert_mlp_matches_per_group_loop(mlp_fns, impl, activation, case):
    _check_mlp(mlp_fns(activation, impl=impl), activation, GS_CASES[case], seed=5)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_tiled_expert_mlp_any_tile(mlp_fns, tile, activation):
    run = mlp_fns(activation, tile=tile, use_tiled=True)
    for case in ("ragged_tail", "all_in_one_group", "empty_groups", "one_row_per_group"):
        _check_mlp(run, activation, GS_CASES[case], seed=6)


def test_expert_mlp_gelu_is_exact_erf():
    """At u = 1, exact gelu is 0.8413447..., the tanh approximation 0.8411920..."""
    x = jnp.ones((3, 1))
    w_up = jnp.ones((3, 1, 1))
    w_down = jnp.ones((3, 1, 1))
    for impl in IMPLS:
        y = kernels.expert_mlp(
            x, (w_up,), w_down, jnp.array([1, 1, 1]), activation="gelu", implementation=impl
        )
        np.testing.assert_allclose(
            np.asarray(y)[:, 0], 0.5 * (1 + math.erf(1 / math.sqrt(2))), rtol=2e-6
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_mlp_bfloat16_forward(impl, activation):
    x, w_in, w_down, _ = _mlp_inputs(7, activation)
    gs = GS_CASES["ragged_tail"]
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)  # noqa: E731

    @jax.jit
    def run(x, w_in, w_down, gs):
        return kernels.expert_mlp(x, w_in, w_down, gs, activation=activation, implementation=impl)

    y = run(bf(x), tuple(bf(a) for a in w_in), bf(w_down), gs)
    assert y.dtype == jnp.bfloat16
    ry, *_ = ref_mlp(x, w_in, w_down, gs, activation, np.zeros((M, D)))
    _close(y, ry, **TOL[jnp.bfloat16])
    np.testing.assert_array_equal(np.asarray(y, np.float32)[_used(gs) :], 0.0)


def test_expert_mlp_argument_errors():
    x, w = jnp.ones((4, 2)), jnp.ones((3, 2, 2))
    gs = jnp.array([1, 1, 1])
    with pytest.raises(ValueError, match="'tanh'"):
        kernels.expert_mlp(x, (w,), w, gs, activation="tanh")
    with pytest.raises(ValueError, match="swiglu"):
        kernels.expert_mlp(x, (w,), w, gs, activation="swiglu")
    with pytest.raises(ValueError, match="gelu"):
        kernels.expert_mlp(x, (w, w), w, gs, activation="gelu")


# ------------------------------------------------------------------------------ tile plan


def _check_plan(gs, m, tile):
    gs = np.asarray(gs, np.int64)
    plan = jax.jit(tiled.make_tile_plan, static_argnums=(1, 2))(jnp.asarray(gs, jnp.int32), m, tile)
    assert plan.tile == tile
    tile_group = np.asarray(plan.tile_group)
    num_tiles = int(plan.num_tiles)
    padded_src = np.asarray(plan.padded_src)
    row_to_padded = np.asarray(plan.row_to_padded)
    p = padded_src.shape[0]
    assert row_to_padded.shape == (m,)
    assert p == tile_group.shape[0] * tile
    assert num_tiles == int(np.sum(-(-gs // tile)))
    assert num_tiles <= tile_group.shape[0]
    # Valid tiles belong to groups in ascending order; each group has exactly ceil(gs/tile).
    np.testing.assert_array_equal(
        tile_group[:num_tiles], np.repeat(np.arange(len(gs)), -(-gs // tile))
    )
    used = int(gs.sum())
    group_of_row = np.repeat(np.arange(len(gs)), gs)
    dest = row_to_padded[:used]
    assert np.all(dest >= 0) and np.all(dest < num_tiles * tile)  # inside a valid tile
    assert len(np.unique(dest)) == used  # distinct
    np.testing.assert_array_equal(tile_group[dest // tile], group_of_row)  # a tile of its group
    np.testing.assert_array_equal(padded_src[dest], np.arange(used))  # inverse on used rows
    assert np.all(row_to_padded[used:] >= p)  # unused rows go nowhere
    # Every other padded row is a zero row (src >= m), so unused rows are never read.
    other = np.setdiff1d(np.arange(p), dest)
    assert np.all(padded_src[other] >= m)
    # Each non-empty group starts on a tile boundary.
    starts = np.cumsum(gs) - gs
    for g in np.flatnonzero(gs):
        assert row_to_padded[starts[g]] % tile == 0


@pytest.mark.parametrize("tile", [1, 3, 4, 8, 32])
def test_make_tile_plan_invariants_random(tile):
    rng = np.random.default_rng(tile)
    for _ in range(6):
        m = int(rng.integers(1, 80))
        g = int(rng.integers(1, 9))
        used = int(rng.integers(0, m + 1))
        gs = rng.multinomial(used, rng.dirichlet(np.full(g, 0.5)))
        _check_plan(gs, m, tile)


@pytest.mark.parametrize("case", list(GS_CASES))
@pytest.mark.parametrize("tile", [1, 4, 7, 64])
def test_make_tile_plan_invariants_catalogue(case, tile):
    _check_plan(GS_CASES[case], M, tile)


@pytest.mark.parametrize(
    "rows, groups, expected",
    [
        (8192, 8, 512),
        (8192, 64, 64),
        (8192, 2, 512),
        (1000, 4, 64),
        (100, 100, 32),
        (1, 1, 32),
        (256, 2, 64),
        (255, 2, 32),
        (10**7, 3, 512),
    ],
)
def test_default_tile(rows, groups, expected):
    tile = tiled.default_tile(rows, groups)
    assert tile == expected
    assert isinstance(tile, int) and tile & (tile - 1) == 0 and 32 <= tile <= 512


# ------------------------------------------------------------------------------ cost follows rows


def test_xla_loop_trip_count_follows_used_rows_only():
    """The "xla" loop runs `num_tiles = sum(ceil(gs / tile))` times: more empty groups or more
    unused rows do not add a single tile."""
    tile = 8
    num_tiles = jax.jit(lambda gs, m: tiled.make_tile_plan(gs, m, tile).num_tiles, static_argnums=1)
    base = np.array([5, 0, 17, 3], np.int32)  # 1 + 0 + 3 + 1 tiles
    n = int(num_tiles(jnp.asarray(base), 40))
    assert n == 5
    more_groups = np.concatenate([base, np.zeros(60, np.int32)])
    assert int(num_tiles(jnp.asarray(more_groups), 40)) == n
    assert int(num_tiles(jnp.asarray(base), 4000)) == n
    assert int(num_tiles(jnp.zeros(64, jnp.int32), 4000)) == 0


def test_xla_loop_bound_is_num_tiles_in_jaxpr():
    """The tiled matmul is a loop whose trip count is data dependent (the plan's `num_tiles`),
    not a static loop over all groups or all rows."""
    x, w = jnp.ones((M, K)), jnp.ones((G, K, N))
    jaxpr = jax.make_jaxpr(lambda x, w, gs: kernels.grouped_matmul(x, w, gs, implementation="xla"))(
        x, w, jnp.zeros(G, jnp.int32)
    )
    text = str(jaxpr)
    assert "while" in text
    assert "ragged_dot" not in text


@pytest.mark.parametrize("use_mlp", [False, True])
def test_xla_never_touches_unused_rows_or_empty_groups(use_mlp):
    """NaNs in unused rows of x and in the weights of empty groups cannot leak into a loop that
    never reads them: the output and all gradients stay finite and equal the reference."""
    gs = jnp.array([9, 0, 0, 7, 0, 4], jnp.int32)  # 20 of 32 rows used, 3 empty groups
    g, used = len(gs), int(gs.sum())
    empty = np.asarray(gs) == 0
    x, w_gate, w_up, w_down, ct = _inputs(8, (M, D), (g, D, F), (g, D, F), (g, F, D), (M, D))
    x[used:] = np.nan
    for a in (w_gate, w_up, w_down):
        a[empty] = np.nan
    if use_mlp:

        def f(x, w_gate, w_up, w_down):
            return kernels.expert_mlp(x, (w_gate, w_up), w_down, gs, implementation="xla")

        args = (x, w_gate, w_up, w_down)
    else:

        def f(x, w_gate):
            return kernels.grouped_matmul(x, w_gate, gs, implementation="xla")

        args = (x, w_gate)
        ct = np.random.default_rng(9).normal(size=(M, F)).astype(np.float32)
    args = tuple(jnp.asarray(a) for a in args)
    y, vjp = jax.vjp(jax.jit(f), *args)
    grads = vjp(ct)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_array_equal(np.asarray(y)[used:], 0.0)
    for gr in grads:
        assert np.isfinite(np.asarray(gr)).all()
    np.testing.assert_array_equal(np.asarray(grads[0])[used:], 0.0)
    for gr in grads[1:]:
        np.testing.assert_array_equal(np.asarray(gr)[empty], 0.0)
    xc = np.where(np.isnan(x), 0.0, x)
    clean = [np.where(np.isnan(a), 0.0, a) for a in map(np.asarray, args[1:])]
    if use_mlp:
        ry, rdx, rdw_in, rdw_down = ref_mlp(xc, clean[:2], clean[2], gs, "swiglu", ct)
        _close(y, ry)
        _close(grads[0], rdx)
        _close(grads[1], rdw_in[0])
        _close(grads[2], rdw_in[1])
        _close(grads[3], rdw_down)
    else:
        ry, rdx, rdw = ref_gmm(xc, clean[0], gs, ct)
        _close(y, ry)
        _close(grads[0], rdx)
        _close(grads[1], rdw)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_unused_gives_zeros(impl):
    gs = jnp.zeros(G, jnp.int32)
    plan = tiled.make_tile_plan(gs, M, tiled.default_tile(M, G))
    assert int(plan.num_tiles) == 0
    x, w = map(jnp.asarray, _inputs(9, (M, K), (G, K, N)))
    y = kernels.grouped_matmul(x, w, gs, implementation=impl)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((M, N)))


# ------------------------------------------------------------------------------ NumPy inputs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["eager_numpy_weights", "jit_numpy_group_sizes"])
def test_numpy_inputs_are_accepted(impl, where):
    """Like every jax.numpy function (and like "ragged_dot"), NumPy arrays work as inputs."""
    x, w, ct = _inputs(11, (M, K), (G, K, N), (M, N))
    gs = GS_CASES["ragged_tail"]
    if where == "eager_numpy_weights":
        y = kernels.grouped_matmul(x, w, jnp.asarray(gs), implementation=impl)
    else:
        y = jax.jit(lambda x, w: kernels.grouped_matmul(x, w, gs, implementation=impl))(x, w)
    _close(y, ref_gmm(x, w, gs, ct)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_rows(impl):
    """An empty batch of rows (e.g. a capacity-0 plan with `max_rows = 0`) gives an empty output."""
    w = jnp.ones((G, K, K))
    gs = jnp.zeros(G, jnp.int32)
    x = jnp.ones((0, K))
    assert kernels.grouped_matmul(x, w, gs, implementation=impl).shape == (0, K)
    y = kernels.expert_mlp(x, (w,), w, gs, activation="relu", implementation=impl)
    assert y.shape == (0, K)
