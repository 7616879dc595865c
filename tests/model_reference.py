"""Plain reference of the transformer LM: one row, one head and one layer at a time, float64.

Written from the model's description (pre-norm blocks, RMSNorm, grouped-query causal attention
with RoPE pairing feature i with i + A/2, sliding windows, sink logits and document segments,
SwiGLU FFNs, MoE layers via `moe_reference`), not from jmoe's code. It reads the unrolled
parameter tree (`layers_{i}/...`).
"""

from __future__ import annotations

import numpy as np

import moe_reference as ref


def ref_rms_norm(x, scale, eps: float):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale)


def ref_rope(x_SxA, positions_S, theta: float):
    """RoPE as a complex rotation of the pairs (x_i, x_{i + A/2}) by `pos * theta**(-2i/A)`."""
    x_SxA = np.asarray(x_SxA, np.float64)
    a = x_SxA.shape[-1]
    z = x_SxA[:, : a // 2] + 1j * x_SxA[:, a // 2 :]
    freq = theta ** (-2.0 * np.arange(a // 2) / a)
    z = z * np.exp(1j * np.asarray(positions_S, np.float64)[:, None] * freq[None, :])
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_visible(query_pos, key_pos, window=None, query_doc=None, key_doc=None):
    """`[S, T]` bool by loops: key position <= query position, within the last `window`
    positions (p - W + 1 .. p), and of the same document when documents are given."""
    visible = np.zeros((len(query_pos), len(key_pos)), bool)
    for s, p in enumerate(query_pos):
        for t, q in enumerate(key_pos):
            ok = q <= p and (window is None or q >= p - window + 1)
            visible[s, t] = ok and (query_doc is None or query_doc[s] == key_doc[t])
    return visible


def ref_attention(p: dict, x_SxD, positions_S, cfg, visible_SxT=None, kv=None):
    """One row of grouped-query attention, head by head.

    `p` is the layer's `attn` params. Keys and values come from `x_SxD` itself (causal mask
    `t <= s` unless `visible_SxT` is given) or, for cache checks, from `kv = (k_TxGxA, v_TxGxA)`.
    With `p["sinks"]`, head h's softmax denominator also holds `exp(sinks[h])`; with
    `p["o"]["bias"]` the output gets that bias.
    Returns the output `[S, D]` and this row's rotated keys and values `[S, G, A]`.
    """
    x = np.asarray(x_SxD, np.float64)
    h, g, a = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
    w = {name: np.asarray(p[name]["kernel"], np.float64) for name in ("q", "k", "v", "o")}

    def project(name, head):
        y = x @ w[name][:, head, :]
        if "bias" in p[name]:
            y = y + np.asarray(p[name]["bias"])[head]
        if cfg.qk_norm and name in ("q", "k") and cfg.qk_norm_scope == "projection":
            y_SxNxA = np.einsum("sd,dna->sna", x, w[name])
            if "bias" in p[name]:
                y_SxNxA = y_SxNxA + np.asarray(p[name]["bias"])
            scale_NxA = np.asarray(p[f"{name}_norm"]["scale"], np.float64)
            rms_S = np.sqrt((y_SxNxA**2).mean((1, 2)) + cfg.norm_eps)
            y = y / rms_S[:, None] * scale_NxA[head]
        elif cfg.qk_norm and name in ("q", "k"):
            y = ref_rms_norm(y, p[f"{name}_norm"]["scale"], cfg.norm_eps)
        return ref_rope(y, positions_S, cfg.rope_theta) if name in ("q", "k") else y

    keys = np.stack([project("k", j) for j in range(g)], axis=1)
    values = np.stack([project("v", j) for j in range(g)], axis=1)
    k_all, v_all = (keys, values) if kv is None else kv
    s, t = x.shape[0], k_all.shape[0]
    if visible_SxT is None:
        visible_SxT = np.arange(t)[None, :] <= np.arange(s)[:, None]
    out = np.zeros((s, w["o"].shape[-1]))
    if "bias" in p["o"]:
        out += np.asarray(p["o"]["bias"], np.float64)
    for head in range(h):
        j = head // (h // g)
        scores = project("q", head) @ k_all[:, j, :].T / np.sqrt(a)
        scores = np.where(visible_SxT, scores, -np.inf)
        sink = float(p["sinks"][head]) if "sinks" in p else -np.inf
        top = np.maximum(scores.max(-1, keepdims=True), sink)
        weights = np.exp(scores - top)
        probs = weights / (weights.sum(-1, keepdims=True) + np.exp(sink - top))
        out += (probs @ v_all[:, j, :]) @ w["o"][head]
    return out, keys, values


def ref_swiglu(p: dict, x_SxD):
    x = np.asarray(x_SxD, np.float64)
    gate = x @ np.asarray(p["w_gate"], np.float64)
    hidden = gate / (1.0 + np.exp(-gate)) * (x @ np.asarray(p["w_up"], np.float64))
    return hidden @ np.asarray(p["w_down"], np.float64)


def ref_moe_top_k(p: dict, bias, x_SxD, moe_cfg):
    """A dropless top-k MoE FFN with SwiGLU experts, token by token (routing by `moe_reference`)."""
    x = np.asarray(x_SxD, np.float64)
    logits = x @ np.asarray(p["router"]["kernel"], np.float64)
    ids, weights, _ = ref.ref_top_k(
        logits,
        moe_cfg.router.k,
        score=moe_cfg.router.score,
        normalize=moe_cfg.router.normalize,
        scale=moe_cfg.router.scale,
        bias=bias,
    )
    experts = {k: np.asarray(w, np.float64) for k, w in p["experts"].items()}
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            expert = {k: experts[k][e] for k in ("w_gate", "w_up", "w_down")}
            y[t] += w * ref_swiglu(expert, x[t : t + 1])[0]
    return y


def ref_transformer(variables: dict, tokens_BxS, cfg, docs_BxS=None):
    """Logits `[B, S, V]` float64 of the unrolled-layout model (top-k SwiGLU MoE layers without
    shared experts only). With document ids `docs_BxS`, tokens see only their own document and
    positions count from each document's first token."""
    params, state = variables["params"], variables.get("moe_state", {})
    embedding = np.asarray(params["embed"]["embedding"], np.float64)
    logits = []
    for b, row in enumerate(np.asarray(tokens_BxS)):
        x = embedding[row]
        index = np.arange(len(row))
        docs = None if docs_BxS is None else np.asarray(docs_BxS)[b]
        positions = index.copy()
        for t in range(1, len(row)):
            if docs is not None and docs[t] == docs[t - 1]:
                positions[t] = positions[t - 1] + 1
            elif docs is not None:
                positions[t] = 0
        for i in range(cfg.n_layers):
            p = params[f"layers_{i}"]
            window = None
            if cfg.layer_types is not None and cfg.layer_types[i] == "sliding_attention":
                window = cfg.sliding_window
            visible = ref_visible(index, index, window, docs, docs)
            h = ref_rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
            x = x + ref_attention(p["attn"], h, positions, cfg, visible)[0]
            h = ref_rms_norm(x, p["ffn_norm"]["scale"], cfg.norm_eps)
            if "moe" in p:
                bias = np.asarray(state[f"layers_{i}"]["moe"]["bias"])
                x = x + ref_moe_top_k(p["moe"], bias, h, cfg.moe)
            else:
                x = x + ref_swiglu(p["mlp"], h)
        x = ref_rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
        head = embedding.T if cfg.tie_embeddings else np.asarray(params["lm_head"]["kernel"])
        logits.append(x @ head)
    return np.stack(logits)
