"""Per-token statistics of a trained run on its held-out text: each target token's cross-entropy
and the routed experts every MoE layer ran for it, to ask whether harder tokens get more experts.

    stats = held_out_token_stats("runs/top_p")
    stats.loss_N.mean()           # the run's held-out loss (over the same batches)
    stats.experts_LxN.sum(0)      # routed experts per token over all MoE layers
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe.lm.model import Transformer
from jmoe.train import data
from jmoe.train.errors import UserError
from jmoe.train.run import load_state
from jmoe.train.trainer import prepare_data

LAYER_PREFIX = "layers_"


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """Held-out statistics of the real (masked-in) target tokens, in batch order.

    Attributes:
      loss_N: cross-entropy (nats) of each of the N tokens.
      experts_LxN: routed experts each MoE layer ran for each token (summed over chain steps,
        before any capacity drop; null picks and top-p cut-offs are not counted).
      active_experts_L: the layers' own `active_experts` statistic, token-weighted over batches.
    """

    loss_N: np.ndarray
    experts_LxN: np.ndarray
    active_experts_L: np.ndarray


def make_token_step(model: Transformer):
    """`token_step(params, moe_state, batch) -> (ce [B, S], experts [L_moe, B, S], stats)`, to
    be jitted; the model must not scan its layers (`model.config.scan_layers=False`)."""
    if model.config.scan_layers:
        raise UserError(
            "per-token statistics read each layer's routing, which scanned layers do not "
            "expose: use model.scan_layers=false"
        )

    def token_step(params, moe_state, batch):
        (logits_BxSxV, stats), variables = model.apply(
            {"params": params, "moe_state": moe_state},
            batch["inputs"],
            deterministic=True,
            token_mask_BxS=batch["mask"],
            mutable=["intermediates"],
        )
        ce_BxS = optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, batch["targets"])
        layers = variables.get("intermediates", {})
        names = sorted(
            (name for name in layers if name.startswith(LAYER_PREFIX)),
            key=lambda name: int(name[len(LAYER_PREFIX) :]),
        )
        shape = batch["inputs"].shape
        experts = [
            sum(r.valid.sum(-1) for r in layers[name]["moe"]["routing"]).reshape(shape)
            for name in names
        ]
        experts_LxBxS = jnp.stack(experts) if experts else jnp.zeros((0, *shape), jnp.int32)
        return ce_BxS, experts_LxBxS, stats

    return token_step


def held_out_token_stats(workdir: str | os.PathLike, max_batches: int | None = None) -> TokenStats:
    """`TokenStats` of the newest checkpoint of a run directory on its held-out split.

    Args:
      workdir: a `train_and_evaluate` run directory (one process).
      max_batches: held-out batches to read (default: the run's `train.eval_batches`, so the
        mean loss is the run's held-out loss; None there means all of them).
    """
    config, state = load_state(workdir)
    tokenizer, _, eval_docs = prepare_data(config, os.fspath(workdir), resume=True)
    batches = data.eval_iterator(
        eval_docs, tokenizer, seq_len=config.data.seq_len, batch_size=config.data.batch_size
    )
    limit = max_batches if max_batches is not None else config.train.eval_batches
    step = jax.jit(make_token_step(Transformer(config.model)))
    losses, experts, active, weights = [], [], [], []
    for batch in itertools.islice(batches, limit):
        ce_BxS, experts_LxBxS, stats = jax.device_get(
            step(state.params, state.moe_state, jax.tree.map(jnp.asarray, batch))
        )
        mask_BxS = np.asarray(batch["mask"], bool)
        losses.append(ce_BxS[mask_BxS])
        experts.append(experts_LxBxS[:, mask_BxS])
        active.append(stats["active_experts"])
        weights.append(mask_BxS.sum())
    if not losses:
        raise UserError(f"{os.fspath(workdir)!r} has no held-out batch to evaluate")
    return TokenStats(
        loss_N=np.concatenate(losses).astype(np.float64),
        experts_LxN=np.concatenate(experts, axis=1).astype(np.float64),
        active_experts_L=np.average(np.stack(active), axis=0, weights=weights),
    )
