"""Plain float64 references of YaRN RoPE and multi-head latent attention, one head at a time.

Written from the methods' descriptions (YaRN: a linear ramp over the frequency index between the
indices that turn `beta_fast` and `beta_slow` times over the pretraining context; MLA: the
DeepSeek-V2/V3 equations with a low-rank query, a normalised key/value latent and one rotated
key shared by all heads), not from jmoe's code. `params` is one layer's `attn` tree.
"""

from __future__ import annotations

import numpy as np
from model_reference import ref_rms_norm


def ref_yarn(dim, theta, factor, length, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN's rotation frequencies `[dim/2]`.

    Frequency i turns `length * f_i / (2 pi)` times over the pretraining context. Solving
    `turns(i) = beta` for i gives the bounds of a linear ramp in i: below the `beta_fast` bound
    the frequency is kept, above the `beta_slow` bound it is divided by `factor`.
    """
    base = theta ** (-2.0 * np.arange(dim // 2) / dim)

    def index_turning(beta):
        return np.log(length / (2 * np.pi * beta)) / np.log(theta) * dim / 2

    low, high = index_turning(beta_fast), index_turning(beta_slow)
    if truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0.0), min(high, dim - 1.0)
    width = high - low if high != low else 1e-3
    interpolated_share = np.clip((np.arange(dim // 2) - low) / width, 0, 1)
    return base * (1 - interpolated_share) + base / factor * interpolated_share


def ref_rotate(x_SxA, positions_S, freq, magnitude=1.0):
    """The pairs `(x_i, x_{i + A/2})` as complex numbers turned by `position * freq[i]`."""
    x = np.asarray(x_SxA, np.float64)
    a = x.shape[-1]
    z = (x[:, : a // 2] + 1j * x[:, a // 2 :]) * magnitude
    z = z * np.exp(1j * np.asarray(positions_S, np.float64)[:, None] * freq[None, :])
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_mla(params, x_SxD, positions_S, mla, n_heads, theta, eps, yarn=None):
    """One row of causal multi-head latent attention.

    `yarn` is None or a dict of `ref_yarn` arguments plus `magnitude` (the scale on the rotated
    features) and `softmax` (the extra softmax scale). Returns the output `[S, D]`, the normalised
    latents `[S, R]` and the rotated shared keys `[S, P]`.
    """
    x = np.asarray(x_SxD, np.float64)
    w = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items() if "kernel" in v}
    nope, rope_dim, rank = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    if mla.q_lora_rank is None:
        q_SxHxQ = np.einsum("sd,dhq->shq", x, w["q"])
    else:
        q_latent = ref_rms_norm(x @ w["q_a"], params["q_a_norm"]["scale"], eps)
        q_SxHxQ = np.einsum("sl,lhq->shq", q_latent, w["q_b"])
    compressed = x @ w["kv_a"]
    latent_SxR = ref_rms_norm(compressed[:, :rank], params["kv_a_norm"]["scale"], eps)
    if yarn is None:
        freq, magnitude, softmax = theta ** (-2.0 * np.arange(rope_dim // 2) / rope_dim), 1.0, 1.0
    else:
        yarn = dict(yarn)
        magnitude, softmax = yarn.pop("magnitude"), yarn.pop("softmax")
        freq = ref_yarn(rope_dim, theta, **yarn)
    k_rope_SxP = ref_rotate(compressed[:, rank:], positions_S, freq, magnitude)
    s = x.shape[0]
    causal = np.arange(s)[None, :] <= np.arange(s)[:, None]
    scale = softmax / np.sqrt(nope + rope_dim)
    out = np.zeros((s, w["o"].shape[-1]))
    for h in range(n_heads):
        k_nope = latent_SxR @ w["kv_b"][:, h, :nope]
        v = latent_SxR @ w["kv_b"][:, h, nope:]
        q_rope = ref_rotate(q_SxHxQ[:, h, nope:], positions_S, freq, magnitude)
        scores = (q_SxHxQ[:, h, :nope] @ k_nope.T + q_rope @ k_rope_SxP.T) * scale
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out += probs @ v @ w["o"][h]
    return out, latent_SxR, k_rope_SxP
