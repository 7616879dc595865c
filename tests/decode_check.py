"""The check that cached decoding equals the full forward, shared by the attention variants'
tests (grouped-query and latent attention)."""

import jax
import numpy as np

from jmoe.lm.model import Transformer


def assert_decode_matches_forward(cfg, variables, tokens_BxS, full_logits_BxSxV, cache, steps=3):
    """Prefill right-padded prompts of lengths 2 and 4, then `steps` single-token decodes with
    each row at its own position: every logit equals the full forward's at that position."""
    b = tokens_BxS.shape[0]
    decode = jax.jit(
        lambda v, t, p, c: Transformer(cfg).apply(v, t, p, c, method=Transformer.decode)
    )
    lengths = np.array([2, 4])
    prompt = np.where(np.arange(4) < lengths[:, None], tokens_BxS[:, :4], 0)
    logits, cache = decode(variables, prompt, np.broadcast_to(np.arange(4), (b, 4)), cache)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(logits[row, :n], full_logits_BxSxV[row, :n], atol=1e-4)
    position = lengths.copy()
    for _ in range(steps):
        step = tokens_BxS[np.arange(b), position][:, None]
        logits, cache = decode(variables, step, position[:, None], cache)
        for row in range(b):
            np.testing.assert_allclose(
                logits[row, 0], full_logits_BxSxV[row, position[row]], atol=1e-4
            )
        position += 1
