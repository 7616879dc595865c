"""Lazy reading of a Hugging Face checkpoint directory: `config.json` and safetensors files.

A directory holds `config.json` and either one `model.safetensors` or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> file). Tensors are read one at a
time with `safetensors.safe_open` (memory-mapped), so a checkpoint larger than host memory can
be converted tensor by tensor. The reader records which tensors were read, so the caller can
refuse a checkpoint with tensors left over.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from jmoe.convert import quant
from jmoe.convert.errors import CheckpointError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' NumPy backend cannot return these; they are read from the file's own header.
FLOAT8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


class HFCheckpoint:
    """A local Hugging Face model directory, read lazily.

    Attributes:
      path: the directory.
      config: the parsed `config.json`.
      weight_map: tensor name -> file name (relative to `path`).
      listing: the file that lists the tensors (the index, or the single safetensors file).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path!r} is not a directory: pass a local HF model dir")
        self.config = _parse_json(self._read_text(CONFIG_FILE), CONFIG_FILE)
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}
        self._used: set[str] = set()
        self.fp8_block: int | None = None  # set for FP8 block-scaled checkpoints

    def _read_text(self, name: str) -> str:
        file = os.path.join(self.path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"missing file {file!r}: a HF model directory needs {name}")
        with open(file) as f:
            return f.read()

    def _weight_map(self) -> dict[str, str]:
        if os.path.isfile(os.path.join(self.path, INDEX_FILE)):
            self.listing = INDEX_FILE
            index = _parse_json(self._read_text(INDEX_FILE), INDEX_FILE)
            weight_map = dict(index.get("weight_map", {}))
            for file in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.path, file)):
                    raise CheckpointError(
                        f"missing file {os.path.join(self.path, file)!r}, listed in {INDEX_FILE}"
                    )
            return weight_map
        if not os.path.isfile(os.path.join(self.path, SINGLE_FILE)):
            raise CheckpointError(
                f"missing file: {self.path!r} has neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        self.listing = SINGLE_FILE
        with _open(os.path.join(self.path, SINGLE_FILE)) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)

    def _handle(self, file: str):
        # 1. Only the file being read stays open (memory-mapped): pages of finished shards are
        # released, so host memory holds the converted tensors, not the whole checkpoint too.
        if file not in self._handles:
            self._handles.clear()
            self._handles[file] = _open(os.path.join(self.path, file))
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name` (without reading its data)."""
        self._require(name)
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor `name` as a NumPy array (bfloat16 / float8 via `ml_dtypes`), marked as used.

        An FP8 weight with a `{name}_scale_inv` beside it is dequantised to float32 (blocks of
        `fp8_block`, see `jmoe.convert.quant`).

        Raises:
          CheckpointError: the tensor is missing, or its shape is not `shape` (when given).
        """
        self._require(name)
        file = self.weight_map[name]
        if shape is not None and (found := self.shape(name)) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {file!r} has shape {found}, expected {tuple(shape)}"
            )
        self._used.add(name)
        if (dtype := self._handle(file).get_slice(name).get_dtype()) not in FLOAT8:
            return self._handle(file).get_tensor(name)
        tensor = _read_float8(os.path.join(self.path, file), name, FLOAT8[dtype])
        if f"{name}_scale_inv" not in self.weight_map:
            return tensor
        if self.fp8_block is None:
            raise CheckpointError(
                f"{name!r} in {file!r} has block scales but config.json has no "
                "quantization_config.weight_block_size"
            )
        scale = self.get(f"{name}_scale_inv")
        try:
            return quant.dequantize_fp8_blocks(tensor, scale, self.fp8_block)
        except ValueError as e:
            raise CheckpointError(f"tensor {name!r} in {file!r}: {e}") from None

    def skip(self, name: str) -> None:
        """Marks `name` as deliberately not converted."""
        self._used.add(name)

    def _require(self, name: str) -> None:
        if name not in self.weight_map:
            where = os.path.join(self.path, self.listing)
            raise CheckpointError(f"missing tensor {name!r}: not in {where!r}")

    def unused(self) -> list[str]:
        """Tensor names never read or skipped, sorted."""
        return sorted(set(self.weight_map) - self._used)

    def close(self) -> None:
        """Releases the open (memory-mapped) file; reading again reopens it."""
        self._handles.clear()


def _open(file: str):
    """`safe_open` of one file; a file that is not safetensors raises a CheckpointError."""
    try:
        return safe_open(file, framework="numpy")
    except SafetensorError as e:
        raise CheckpointError(
            f"{file!r} is not a readable safetensors file ({e}): the download may be truncated "
            "or corrupt; fetch the file again"
        ) from None


def _parse_json(text: str, name: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{name} is not valid JSON ({e}): fix or re-download it") from None


def _read_float8(file: str, name: str, dtype) -> np.ndarray:
    """A float8 tensor of a safetensors file, from the header the format defines (an 8-byte
    little-endian header length, a JSON table of dtype, shape and data offsets, the data)."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(header_len))[name]
    start, _ = entry["data_offsets"]
    shape = tuple(entry["shape"])
    return np.array(np.memmap(file, dtype, "r", offset=8 + header_len + start, shape=shape))
