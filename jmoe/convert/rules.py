"""Tensor rules: how jmoe variables are read from, and written to, Hugging Face tensors.

A rule ties one or more jmoe variable paths (unrolled layer layout, collection first, e.g.
`("params", "layers_0", "attn", "q", "kernel")`) to the HF tensors they come from. `read`
returns the jmoe arrays (NumPy, in the checkpoint's dtype); `write` is its exact inverse
(transposes and reshapes only), so export then import is bit-identical.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jmoe.convert import quant
from jmoe.convert.reader import HFCheckpoint

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base rule: `paths` are the jmoe variables it produces, in `read`'s order."""

    paths: tuple[Path, ...]

    def read(self, ckpt: HFCheckpoint) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def write(self, arrays: tuple[np.ndarray, ...]) -> dict[str, np.ndarray]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Copy(Rule):
    """One tensor, reshaped: norm scales, biases, the embedding, router biases."""

    name: str = ""
    hf_shape: tuple[int, ...] = ()
    shape: tuple[int, ...] = ()

    def read(self, ckpt):
        return (ckpt.get(self.name, self.hf_shape).reshape(self.shape),)

    def write(self, arrays):
        return {self.name: np.asarray(arrays[0]).reshape(self.hf_shape)}


@dataclasses.dataclass(frozen=True)
class Linear(Rule):
    """A `torch.nn.Linear` weight `[out, in]` as an input-first kernel `shape`, whose first
    `in_dims` axes are the flattened input (`q/kernel [D, H, A]`: 1; `o/kernel [H, A, D]`: 2).

    `out_perm` reorders the kernel's last axis on reading (`kernel[..., out_perm]`), e.g. to turn
    interleaved RoPE features into rotate-half ones; writing undoes it.
    """

    name: str = ""
    shape: tuple[int, ...] = ()
    in_dims: int = 1
    out_perm: tuple[int, ...] | None = None

    @property
    def hf_shape(self) -> tuple[int, int]:
        return math.prod(self.shape[self.in_dims :]), math.prod(self.shape[: self.in_dims])

    def read(self, ckpt):
        kernel = ckpt.get(self.name, self.hf_shape).T.reshape(self.shape)
        return (kernel if self.out_perm is None else kernel[..., list(self.out_perm)],)

    def write(self, arrays):
        out, inp = self.hf_shape
        kernel = np.asarray(arrays[0])
        if self.out_perm is not None:
            kernel = kernel[..., np.argsort(self.out_perm)]
        return {self.name: np.ascontiguousarray(kernel.reshape(inp, out).T)}


def linear(path: Path, name: str, shape: tuple[int, ...], in_dims: int = 1, out_perm=None):
    return Linear((path,), name, shape, in_dims, None if out_perm is None else tuple(out_perm))


def copy(path: Path, name: str, hf_shape: tuple[int, ...], shape=None) -> Copy:
    return Copy((path,), name, tuple(hf_shape), tuple(shape or hf_shape))


@dataclasses.dataclass(frozen=True)
class Experts(Rule):
    """A MoE layer's SwiGLU experts `w_gate, w_up [E, D, F]`, `w_down [E, F, D]` in either
    HF layout.

    Per expert (`{prefix}.{i}.{gate}.weight [F, D]`, `{up}`, `{down} [D, F]`; Mixtral names them
    w1 / w3 / w2) or fused (transformers 5: `{prefix}.gate_up_proj [E, 2F, D]`, gate rows first,
    and `{prefix}.down_proj [E, D, F]`). Reading takes whichever the checkpoint has; writing
    uses `fused`.
    """

    prefix: str = ""
    num_experts: int = 0
    d_model: int = 0
    d_ff: int = 0
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused: bool = True

    def _per_expert(self, i: int, which: int) -> str:
        return f"{self.prefix}.{i}.{self.names[which]}.weight"

    def read(self, ckpt):
        e, d, f = self.num_experts, self.d_model, self.d_ff
        if f"{self.prefix}.gate_up_proj" in ckpt or self._per_expert(0, 0) not in ckpt:
            gate_up_Ex2FxD = ckpt.get(f"{self.prefix}.gate_up_proj", (e, 2 * f, d))
            down_ExDxF = ckpt.get(f"{self.prefix}.down_proj", (e, d, f))
            w_gate, w_up = np.split(gate_up_Ex2FxD.transpose(0, 2, 1), 2, axis=-1)
            return w_gate, w_up, down_ExDxF.transpose(0, 2, 1)
        stacked = [
            np.stack([ckpt.get(self._per_expert(i, w), shape).T for i in range(e)])
            for w, shape in enumerate(((f, d), (f, d), (d, f)))
        ]
        return tuple(stacked)

    def write(self, arrays):
        w_gate, w_up, w_down = (np.asarray(a) for a in arrays)
        if self.fused:
            gate_up_Ex2FxD = np.concatenate([w_gate, w_up], axis=-1).transpose(0, 2, 1)
            return {
                f"{self.prefix}.gate_up_proj": np.ascontiguousarray(gate_up_Ex2FxD),
                f"{self.prefix}.down_proj": np.ascontiguousarray(w_down.transpose(0, 2, 1)),
            }
        return {
            self._per_expert(i, w): np.ascontiguousarray(a[i].T)
            for w, a in enumerate((w_gate, w_up, w_down))
            for i in range(self.num_experts)
        }


@dataclasses.dataclass(frozen=True)
class InterleavedExperts(Rule):
    """GPT-OSS experts with biases: `w_gate, w_up [E, D, F]`, `w_down [E, F, D]`, `b_gate, b_up
    [E, F]`, `b_down [E, D]`.

    HF stores `{prefix}.gate_up_proj [E, D, 2F]` with gate and up columns interleaved (gate at
    even columns), its bias `gate_up_proj_bias [E, 2F]`, `down_proj [E, F, D]` and
    `down_proj_bias [E, D]`. The released checkpoints hold the weights as MXFP4
    (`{name}_blocks [E, out, in / 32, 16]`, `{name}_scales [E, out, in / 32]`, output-first),
    dequantised here; writing uses the plain float layout.
    """

    prefix: str = ""
    num_experts: int = 0
    d_model: int = 0
    d_ff: int = 0

    def _weight(self, ckpt, name: str, out: int, inp: int) -> np.ndarray:
        """`{name}` `[E, inp, out]`, plain or from its MXFP4 blocks (`[E, out, inp]`)."""
        e, full = self.num_experts, f"{self.prefix}.{name}"
        if full in ckpt or f"{full}_blocks" not in ckpt:
            return ckpt.get(full, (e, inp, out))
        blocks = ckpt.get(f"{full}_blocks", (e, out, inp // 32, 16))
        scales = ckpt.get(f"{full}_scales", (e, out, inp // 32))
        return quant.dequantize_mxfp4(blocks, scales).transpose(0, 2, 1)

    def read(self, ckpt):
        e, d, f = self.num_experts, self.d_model, self.d_ff
        gate_up_ExDx2F = self._weight(ckpt, "gate_up_proj", 2 * f, d)
        down_ExFxD = self._weight(ckpt, "down_proj", d, f)
        bias_Ex2F = ckpt.get(f"{self.prefix}.gate_up_proj_bias", (e, 2 * f))
        b_down = ckpt.get(f"{self.prefix}.down_proj_bias", (e, d))
        # 1. Column 2j is gate unit j, column 2j + 1 up unit j.
        return (
            gate_up_ExDx2F[..., 0::2],
            gate_up_ExDx2F[..., 1::2],
            down_ExFxD,
            bias_Ex2F[:, 0::2],
            bias_Ex2F[:, 1::2],
            b_down,
        )

    def write(self, arrays):
        w_gate, w_up, w_down, b_gate, b_up, b_down = (np.asarray(a) for a in arrays)
        return {
            f"{self.prefix}.gate_up_proj": np.stack([w_gate, w_up], -1).reshape(
                *w_gate.shape[:2], -1
            ),
            f"{self.prefix}.gate_up_proj_bias": np.stack([b_gate, b_up], -1).reshape(
                b_gate.shape[0], -1
            ),
            f"{self.prefix}.down_proj": np.ascontiguousarray(w_down),
            f"{self.prefix}.down_proj_bias": np.ascontiguousarray(b_down),
        }
