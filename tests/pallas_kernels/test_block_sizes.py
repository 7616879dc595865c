"""Block-size heuristic and validation: every default passes its own checks, overrides that
cannot tile the shapes or break a backend's layout rules fail with the values named."""

import jax.numpy as jnp
import pytest

from pallas_kernels.block_sizes import (
    GPU_STAGES,
    BlockSizes,
    check_block_sizes,
    default_block_sizes,
    gpu_num_warps,
    supported,
)

SHAPES = [
    (16384 * 2, 4096, 14336),
    (8192 * 6, 2048, 1408),
    (64, 16, 24),
    (1, 128, 128),
    (37, 96, 200),
]


def test_block_sizes_are_frozen_and_hashable():
    bs = BlockSizes(128, 256, 512)
    assert hash(bs) == hash(BlockSizes(128, 256, 512))
    with pytest.raises(AttributeError):
        bs.tm = 8


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_defaults_pass_their_checks(m, k, n, dtype):
    for interpret in (True, False):
        for backend in ("tpu", "gpu"):
            bs = default_block_sizes(m, k, n, dtype, backend, interpret=interpret)
            if interpret or supported(k, n, dtype, backend):
                check_block_sizes(bs, k, n, dtype, backend, interpret=interpret)
            assert k % bs.tk == 0 and n % bs.tn == 0 and bs.tm >= 1


def test_heuristic_on_model_shapes():
    """Mixtral-like on TPU: blocks that divide the widths and keep the fused SwiGLU kernel's
    double-buffered blocks and float32 accumulators within VMEM; GPU: Triton sizes."""
    bf16 = default_block_sizes(32768, 4096, 14336, jnp.bfloat16, "tpu")
    assert bf16 == BlockSizes(512, 512, 512)
    assert default_block_sizes(32768, 4096, 14336, jnp.float32, "tpu") == BlockSizes(256, 512, 512)
    blocks = 2 * (bf16.tm * bf16.tk + 2 * bf16.tk * bf16.tn + bf16.tm * bf16.tn)  # in / out
    assert blocks * 2 + 2 * bf16.tm * bf16.tn * 4 < 16 * 2**20 // 2  # half the 16 MiB default
    gpu = default_block_sizes(32768, 2048, 1408, jnp.bfloat16, "gpu")
    assert gpu == BlockSizes(128, 64, 128)
    assert default_block_sizes(32768, 2048, 1408, jnp.float32, "gpu") == BlockSizes(128, 32, 128)
    for dtype in (jnp.bfloat16, jnp.float32):  # pipelined x + two weight blocks in shared memory
        bs = default_block_sizes(32768, 2048, 1408, dtype, "gpu")
        stage = (bs.tm * bs.tk + 2 * bs.tk * bs.tn) * jnp.dtype(dtype).itemsize
        assert GPU_STAGES * stage <= 164 * 1024
    assert gpu_num_warps(gpu) == 8 and gpu_num_warps(BlockSizes(32, 64, 128)) == 4
    assert default_block_sizes(20, 2048, 1408, jnp.bfloat16, "gpu").tm == 32  # few rows: small tm
    assert default_block_sizes(64, 16, 24, jnp.float32, "tpu", interpret=True) == BlockSizes(
        64, 16, 24
    )


@pytest.mark.parametrize(
    "bs, backend, dtype, match",
    [
        (BlockSizes(0, 128, 128), "tpu", jnp.float32, "tm=0 must be a positive int"),
        (BlockSizes(8, 100, 128), "tpu", jnp.float32, "k=256 is not a multiple of tk=100"),
        (BlockSizes(8, 128, 100), "tpu", jnp.float32, "n=384 is not a multiple of tn=100"),
        (BlockSizes(8, 128, 128), "tpu", jnp.bfloat16, "tm=8 is not a multiple of 16 for bfloat16"),
        (BlockSizes(16, 64, 128), "tpu", jnp.float32, "tk=64 is neither a multiple of 128"),
        (BlockSizes(16, 128, 96 * 2), "gpu", jnp.float32, "tn=192 is not a power of two"),
        (BlockSizes(8, 128, 128), "gpu", jnp.float32, "tm=8 is not a power of two >= 16"),
        (BlockSizes(16, 128, 128), "cuda", jnp.float32, "backend='cuda'"),
    ],
)
def test_bad_block_sizes_name_the_values(bs, backend, dtype, match):
    with pytest.raises(ValueError, match=match):
        check_block_sizes(bs, 256, 384, dtype, backend)


def test_interpret_skips_the_hardware_rules_only():
    check_block_sizes(BlockSizes(3, 8, 8), 16, 24, jnp.bfloat16, "tpu", interpret=True)
    with pytest.raises(ValueError, match="k=16 is not a multiple of tk=5"):
        check_block_sizes(BlockSizes(3, 5, 8), 16, 24, jnp.float32, "tpu", interpret=True)


def test_supported():
    assert supported(4096, 14336, jnp.bfloat16, "tpu") and supported(
        2048, 1408, jnp.bfloat16, "gpu"
    )
    assert supported(200, 96, jnp.float32, "tpu")  # full-width blocks
    assert not supported(200, 96, jnp.float32, "gpu")  # 200 has no power-of-two block >= 16
    assert not supported(128, 128, jnp.int8, "tpu")
    assert not supported(128, 128, jnp.float32, "cpu")
