"""The dequantisers against plain per-element NumPy loops on random data."""

import ml_dtypes
import numpy as np
import pytest

from jmoe.convert.quant import dequantize_fp8_blocks, dequantize_mxfp4

FP4_VALUES = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize("shape, block", [((8, 12), 4), ((7, 10), 4), ((3, 5), 8)])
def test_fp8_block_scales(shape, block):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(ml_dtypes.float8_e4m3fn)
    scales = rng.uniform(0.1, 3, (-(-shape[0] // block), -(-shape[1] // block))).astype(np.float32)
    want = np.empty(shape, np.float32)
    for o in range(shape[0]):
        for i in range(shape[1]):
            want[o, i] = float(w[o, i]) * scales[o // block, i // block]
    np.testing.assert_array_equal(dequantize_fp8_blocks(w, scales, block), want)


def test_fp8_wrong_scale_shape_is_named():
    w = np.zeros((256, 300), ml_dtypes.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"needs block scales \(2, 3\)"):
        dequantize_fp8_blocks(w, np.ones((2, 2), np.float32))


def test_mxfp4():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (2, 3, 4, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (2, 3, 4), dtype=np.uint8)
    scales[0, 0, 0] = 0  # the smallest power, 2**-127
    want = np.empty((2, 3, 4 * 32), np.float32)
    for idx in np.ndindex(2, 3, 4):
        for byte in range(16):
            value = blocks[idx][byte]
            for half, nibble in enumerate((value & 0x0F, value >> 4)):
                power = np.ldexp(np.float32(1), int(scales[idx]) - 127)
                want[idx[:2] + (idx[2] * 32 + 2 * byte + half,)] = FP4_VALUES[nibble] * power
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), want)


def test_mxfp4_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="disagree"):
        dequantize_mxfp4(np.zeros((2, 4, 16), np.uint8), np.zeros((2, 3), np.uint8))


def test_float8_tensors_are_read_from_files(tmp_path):
    from safetensors.numpy import save_file

    from jmoe.convert.reader import HFCheckpoint

    rng = np.random.default_rng(2)
    tensors = {
        "a": rng.normal(size=(3, 5)).astype(ml_dtypes.float8_e4m3fn),
        "b": rng.normal(size=(4,)).astype(np.float32),
        "c": rng.normal(size=(2, 2)).astype(ml_dtypes.float8_e5m2),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    ckpt = HFCheckpoint(tmp_path)
    for name, value in tensors.items():
        got = ckpt.get(name, value.shape)
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8))
