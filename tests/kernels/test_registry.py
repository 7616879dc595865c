"""The grouped-matmul registry: the fallback order per backend, what `implementation=None` picks
(with the backend and `PALLAS_DEFAULT_BACKENDS` patched), forced names, and the name check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
import pallas_kernels
from jmoe import kernels
from jmoe.kernels import registry
from jmoe.moe import gating

BACKENDS = ("cpu", "gpu", "tpu")
ON = dict(ids=lambda b: f"on_{b}")  # not "gpu" / "tpu": conftest skips tests with those keywords
BIG = dict(shapes=((4096, 14336),), dtype=jnp.bfloat16)  # Mixtral's widths: every kernel takes them
ODD = dict(shapes=((200, 96),), dtype=jnp.float32)  # no power-of-two block for Triton
# A primitive that only the named implementation puts in the jaxpr.
MARKERS = {"xla": "while", "ragged_dot": "ragged_dot_general", "pallas": "pallas_call"}


@pytest.fixture
def on_backend(monkeypatch):
    """`on_backend(b, pallas_default=...)`: resolve as if running on backend `b`."""

    def patch(backend, pallas_default=()):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        monkeypatch.setattr(registry, "PALLAS_DEFAULT_BACKENDS", pallas_default)

    return patch


def _name(op, implementation=None, **problem):
    return registry.resolve(op, implementation, **problem).name


def test_every_implementation_is_registered_under_its_name():
    assert list(kernels.IMPLEMENTATIONS) == ["xla", "ragged_dot", "pallas"]
    for name, impl in registry.IMPLEMENTATIONS.items():
        assert impl.name == name
        assert set(impl.ops) <= set(registry.OPS)
    assert registry.IMPLEMENTATIONS["xla"].ops == registry.OPS  # the twin computes every op
    for name in (None, *kernels.IMPLEMENTATIONS):  # the layer accepts every name
        jmoe.MoEConfig(d_model=16, d_ff=32, num_experts=4, implementation=name)


def test_fallback_order_per_backend(monkeypatch):
    monkeypatch.setattr(registry, "PALLAS_DEFAULT_BACKENDS", ())
    assert registry.fallback_order("tpu") == ("ragged_dot", "xla")
    assert registry.fallback_order("gpu") == ("xla",)
    assert registry.fallback_order("cpu") == ("xla",)
    assert registry.fallback_order("some_new_backend") == ("xla",)
    monkeypatch.setattr(registry, "PALLAS_DEFAULT_BACKENDS", ("tpu", "gpu"))
    assert registry.fallback_order("tpu") == ("pallas", "ragged_dot", "xla")
    assert registry.fallback_order("gpu") == ("pallas", "xla")
    assert registry.fallback_order("cpu") == ("xla",)


@pytest.mark.parametrize("backend", BACKENDS, **ON)
def test_none_never_picks_pallas_off_the_verified_backends(on_backend, backend):
    on_backend(backend)
    fallback = "ragged_dot" if backend == "tpu" else "xla"
    assert _name("grouped_matmul", **BIG) == fallback
    assert _name("expert_mlp", shapes=((4096, 14336), (14336, 4096)), dtype=jnp.bfloat16) == (
        fallback
    )
    assert _name("gating") == "xla"  # "ragged_dot" has no gating


@pytest.mark.parametrize("backend", BACKENDS, **ON)
def test_none_picks_pallas_on_a_verified_backend_where_the_kernels_compile(on_backend, backend):
    on_backend(backend, pallas_default=(backend,))
    compiled = pallas_kernels.available(backend)  # False on "cpu", and on GPU without Triton
    fallback = "ragged_dot" if backend == "tpu" else "xla"
    assert _name("grouped_matmul", **BIG) == ("pallas" if compiled else fallback)
    assert _name("gating") == ("pallas" if compiled else "xla")
    odd = compiled and pallas_kernels.supported(200, 96, jnp.float32, backend)
    assert odd == (backend == "tpu")  # Mosaic takes full-width blocks, Triton does not
    assert _name("grouped_matmul", **ODD) == ("pallas" if odd else fallback)
    # a dtype the kernels do not take falls back too
    assert _name("grouped_matmul", shapes=BIG["shapes"], dtype=jnp.int8) == fallback


def _markers(f, *args):
    """The `MARKERS` of the implementations whose primitives `f(*args)` traces to (traced anew:
    the registry resolves at trace time, and JAX caches traces per function)."""
    text = str(jax.make_jaxpr(lambda *a: f(*a))(*args))
    return [name for name, marker in MARKERS.items() if marker in text]


def test_expert_mlp_needs_both_projections_supported(on_backend, monkeypatch):
    """ "pallas" runs the input projections `[*, D] x [D, F]` and the down projection
    `[*, F] x [F, D]`: `implementation=None` picks it only when the kernels take both."""
    on_backend("tpu", pallas_default=("tpu",))
    d, f = 8, 16
    x, w_in, w_down = jnp.ones((4, d)), jnp.ones((2, d, f)), jnp.ones((2, f, d))
    gs = jnp.array([1, 2])
    mlp = lambda x, w_in, w_down: kernels.expert_mlp(x, (w_in,), w_down, gs, activation="relu")  # noqa: E731
    gmm = lambda x, w: kernels.grouped_matmul(x, w, gs)  # noqa: E731
    monkeypatch.setattr(pallas_kernels, "supported", lambda k, n, dtype, backend: (k, n) == (d, f))
    assert _markers(gmm, x, w_in) == ["pallas"]
    assert _markers(mlp, x, w_in, w_down) == ["ragged_dot"]
    monkeypatch.setattr(pallas_kernels, "supported", lambda k, n, dtype, backend: True)
    assert _markers(mlp, x, w_in, w_down) == ["pallas"]


@pytest.mark.parametrize("backend", BACKENDS, **ON)
def test_a_forced_name_is_used_whatever_the_backend_and_shapes(on_backend, backend):
    on_backend(backend)
    for name in kernels.IMPLEMENTATIONS:
        assert _name("grouped_matmul", name, **ODD) == name
        assert _name("expert_mlp", name, shapes=((7, 9), (9, 7)), dtype=jnp.int8) == name
    assert kernels.gating_implementation("pallas") == "pallas"
    assert kernels.gating_implementation("xla") == "xla"
    assert kernels.gating_implementation("ragged_dot") == "xla"  # its XLA twin


@pytest.mark.parametrize("bad", ["pallas_typo", "XLA", "dense", ""])
def test_unknown_name_error_lists_the_allowed_names(bad):
    allowed = "(None, 'xla', 'ragged_dot', 'pallas')"
    x, w = jnp.ones((4, 2)), jnp.ones((3, 2, 2))
    gs = jnp.array([1, 1, 1])
    calls = (
        lambda: kernels.grouped_matmul(x, w, gs, implementation=bad),
        lambda: kernels.expert_mlp(x, (w, w), w, gs, implementation=bad),
        lambda: kernels.gating_implementation(bad),
        lambda: gating.top_k_gating(x, w[0], 1, implementation=bad),
    )
    for call in calls:
        with pytest.raises(ValueError, match=f"implementation={bad!r} is not one of") as err:
            call()
        assert allowed in str(err.value)


def test_unknown_op_is_an_error():
    with pytest.raises(ValueError, match="op='ragged_mlp' is not one of"):
        registry.resolve("ragged_mlp")


def _loop_reference(x, w, gs):
    """`y[r] = x[r] @ w[group(r)]` in float64, zeros past the groups."""
    y = np.zeros((x.shape[0], w.shape[2]))
    ends = np.cumsum(gs)
    for g, (start, end) in enumerate(zip(ends - gs, ends, strict=True)):
        y[start:end] = np.asarray(x[start:end], np.float64) @ np.asarray(w[g], np.float64)
    return y


@pytest.mark.parametrize("name", [None, *kernels.IMPLEMENTATIONS])
def test_forcing_a_name_runs_that_implementation(name):
    """The jaxpr holds the named implementation's primitive and no other's (None on CPU: the XLA
    loop), and the result is the per-group product."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 8, 16)), jnp.float32)
    w_down = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)
    gs = np.array([5, 0, 4], np.int32)  # an empty group and 3 unused rows

    def gmm(x, w):
        return kernels.grouped_matmul(x, w, gs, implementation=name)

    def mlp(x, w, w_down):
        return kernels.expert_mlp(x, (w,), w_down, gs, activation="relu", implementation=name)

    assert _markers(gmm, x, w) == _markers(mlp, x, w, w_down) == [name or "xla"]
    np.testing.assert_allclose(gmm(x, w), _loop_reference(x, w, gs), rtol=1e-5, atol=1e-5)
    h = np.maximum(_loop_reference(x, w, gs), 0.0)
    np.testing.assert_allclose(
        mlp(x, w, w_down), _loop_reference(h, w_down, gs), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("name", ["pallas", "xla"])
def test_forcing_the_gating_runs_that_implementation(name):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)
    text = str(jax.make_jaxpr(lambda x, w: gating.top_k_gating(x, w, 2, implementation=name))(x, w))
    assert ("pallas_call" in text) == (name == "pallas")
