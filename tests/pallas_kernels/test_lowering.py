"""Every kernel lowered for the accelerators at the presets' real shapes, without the hardware.

`jax.export` runs the Pallas -> Mosaic (TPU) and Pallas -> Triton (GPU) lowering on this machine,
which enforces each backend's rules on block shapes and operations (e.g. Triton's power-of-two
arrays). It stops before the hardware compilers, so `test_compiled.py` is still the last word;
this catches the shape bugs on every CI run.
"""

import contextlib
import functools
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax import export

import pallas_kernels
from jmoe.train import run_config
from pallas_kernels import block_sizes, differentiable, gating

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
PRESETS = ("mixtral_8x7b", "olmoe_1b_7b", "qwen3_moe_30b_a3b", "deepseek_v3_style")
# (D, F, E, k) beyond the presets: DeepSeek-MoE 16B (k = 6) and Qwen1.5-MoE (E = 60).
EXTRA_SHAPES = {"deepseek_moe_16b": (2048, 1408, 64, 6), "qwen1.5_moe": (2048, 1408, 60, 4)}
TOKENS = 2048
PLATFORMS = {"tpu": ("tpu", "tpu_custom_call"), "cuda": ("gpu", "__gpu$xla.gpu.triton")}
PLATFORM_IDS = ("mosaic", "triton")  # not "tpu" / "gpu": conftest skips tests with those keywords


PRESET_MOE = {name: run_config.load_config(CONFIGS / f"{name}.yaml").model.moe for name in PRESETS}
SHAPES = dict(EXTRA_SHAPES) | {
    name: (moe.d_model, moe.d_ff, moe.num_experts, moe.router.k) for name, moe in PRESET_MOE.items()
}


def _backend(platform: str) -> str:
    """The kernel family lowered for `platform` (skips when this JAX lacks Pallas Triton)."""
    if platform == "cuda" and not block_sizes.TRITON_AVAILABLE:
        pytest.skip(f"JAX {jax.__version__} has no Pallas Triton backend")
    return PLATFORMS[platform][0]


def _target(platform: str):
    """No GPU here: Triton reads the GPU generation from an abstract H100."""
    if platform != "cuda":
        return contextlib.nullcontext()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    )


def _lower(fn, platform, *args) -> str:
    backend, custom_call = PLATFORMS[platform]
    checks = [export.DisabledSafetyCheck.custom_call(custom_call)]
    with _target(platform):
        exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
    text = exported.mlir_module()
    assert custom_call in text, f"no {custom_call} kernel in the lowered module"
    return text


def _vjp(fn, *primals):
    """`fn`'s outputs and the gradients of all its inputs for a cotangent equal to the outputs."""
    out, pull = jax.vjp(fn, *primals)
    return out, pull(out)


@pytest.mark.parametrize("platform", PLATFORMS, ids=PLATFORM_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_expert_kernels_lower(platform, shape, dtype):
    d, f, e, k = SHAPES[shape]
    backend = _backend(platform)
    assert pallas_kernels.supported(d, f, dtype, backend)
    assert pallas_kernels.supported(f, d, dtype, backend)
    x = jax.ShapeDtypeStruct((TOKENS * k, d), dtype)
    w_in = jax.ShapeDtypeStruct((e, d, f), dtype)
    w_down = jax.ShapeDtypeStruct((e, f, d), dtype)
    sizes = jax.ShapeDtypeStruct((e,), jnp.int32)
    swiglu = functools.partial(differentiable.swiglu, backend=backend)
    gmm = functools.partial(differentiable.gmm, backend=backend)

    def mlp(x, w_gate, w_up, w_down, sizes):
        h = lambda x, a, b, c: gmm(swiglu(x, a, b, sizes), c, sizes)  # noqa: E731
        return _vjp(h, x, w_gate, w_up, w_down)

    _lower(mlp, platform, x, w_in, w_in, w_down, sizes)


def _groups(shape: str) -> dict:
    """The preset's group-limited selection (DeepSeek-V3 style), if any."""
    moe = PRESET_MOE.get(shape)
    return (
        {} if moe is None else dict(n_groups=moe.router.n_groups, top_groups=moe.router.top_groups)
    )


@pytest.mark.parametrize("platform", PLATFORMS, ids=PLATFORM_IDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("score", gating.SCORES)
def test_gating_lowers(platform, shape, score):
    d, _, e, k = SHAPES[shape]
    backend = _backend(platform)
    x = jax.ShapeDtypeStruct((TOKENS, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d, e), jnp.float32)
    route = functools.partial(gating.top_k_gating, k=k, score=score, normalize=score == "sigmoid",
                              backend=backend, **_groups(shape))  # fmt: skip

    def fwd_bwd(x, w):
        return _vjp(lambda x, w: route(x, w)[1::2], x, w)  # weights and probs

    _lower(fwd_bwd, platform, x, w)


@pytest.mark.parametrize("platform", PLATFORMS, ids=PLATFORM_IDS)
def test_local_groups_lower(platform):
    """Expert parallelism's form: the weights of the local groups only, a traced group offset."""
    d, f, e, k = SHAPES["olmoe_1b_7b"]
    backend = _backend(platform)
    x = jax.ShapeDtypeStruct((TOKENS * k, d), jnp.bfloat16)
    w_local = jax.ShapeDtypeStruct((e // 4, d, f), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((e,), jnp.int32)
    offset = jax.ShapeDtypeStruct((), jnp.int32)

    def fwd_bwd(x, w_gate, w_up, sizes, offset):
        h = functools.partial(differentiable.swiglu, group_sizes=sizes, group_offset=offset,
                              backend=backend)  # fmt: skip
        return _vjp(h, x, w_gate, w_up)

    _lower(fwd_bwd, platform, x, w_local, w_local, sizes, offset)
