"""Training math: the state, the optimizer and its schedule, `train_step`, `eval_step`, and the
data and tokenizer a run trains on (`prepare_data`); `jmoe.train.run` drives them.

One jitted `train_step` computes the token cross-entropy over the mask + the MoE aux losses
(each packed document attends only to itself when the batch carries "segment_ids"),
applies AdamW with warmup + cosine and global-norm clipping behind a non-finite guard that skips
the update, and updates the `moe_state` (bias balancing, compute budget).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jmoe import sharding
from jmoe.hf_tokenizer import load_hf_tokenizer
from jmoe.lm.model import Transformer, update_moe_state
from jmoe.train import data, multihost
from jmoe.train.config import Config, TrainConfig
from jmoe.train.errors import UserError
from jmoe.train.tokenizer import load_tokenizer, make_tokenizer


@flax.struct.dataclass
class TrainState:
    """Everything a step changes (a pytree; checkpointed whole).

    Attributes:
      params: the "params" collection.
      opt_state: optax state.
      moe_state: the "moe_state" collection (selection bias, budget offsets).
      step: steps taken (skipped non-finite steps included), int32 scalar.
      rng: base PRNG key data (uint32); step `s` uses `fold_in(rng, s)`.
      bad_steps: consecutive non-finite steps so far, int32 scalar.
    """

    params: Any
    opt_state: Any
    moe_state: Any
    step: jax.Array
    rng: jax.Array
    bad_steps: jax.Array


def learning_rate_schedule(train: TrainConfig, decay_steps: int | None = None) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `final_lr_fraction` of it at step
    `schedule_end(train, decay_steps)`, constant after.

    A run directory keeps the `decay_steps` it started with (its first `train.steps`): raising
    `train.steps` on a resumed or finished run trains the extra steps at the final rate.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=schedule_end(train, decay_steps),
        end_value=train.learning_rate * train.final_lr_fraction,
    )


def schedule_end(train: TrainConfig, decay_steps: int | None = None) -> int:
    """The step where the learning rate reaches its final value: `decay_steps` (default
    `train.steps`), or just after the warmup when that is longer."""
    return max(train.steps if decay_steps is None else decay_steps, train.warmup_steps + 1)


def decay_mask(params) -> Any:
    """True for the weights that get weight decay: matrices, not norm scales or biases (the
    router's selection bias lives in `moe_state` and is never optimised)."""

    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", k)).lower() for k in path]
        return leaf.ndim >= 2 and not any("norm" in n or "bias" in n for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    train: TrainConfig, decay_steps: int | None = None
) -> optax.GradientTransformation:
    """AdamW (decay masked by `decay_mask`, `learning_rate_schedule(train, decay_steps)`) after
    optional global-norm clipping. The schedule does not change the optimizer state's shape."""
    clip = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip else []
    return optax.chain(
        *clip,
        optax.adamw(
            learning_rate_schedule(train, decay_steps),
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        ),
    )


def init_state(
    config: Config,
    model: Transformer,
    tx: optax.GradientTransformation,
    initial: dict | None = None,
) -> TrainState:
    """Fresh parameters, optimizer and MoE state from `config.train.seed`, created under jit
    and, on a mesh (`model.mesh`), born sharded by `jmoe.sharding.param_shardings` (experts on
    "expert", large weights on "fsdp"; the optimizer moments like their parameters).

    `initial` (`{"params": ...}`, optionally with "moe_state", shaped like the model's own)
    replaces the random parameters: the start of a fine-tuning run (`jmoe.train.init_from`).
    """
    check_trainable(model)
    batch = sharding.axis_size(model.mesh, sharding.BATCH_AXES)
    tokens_BxS = jnp.zeros((batch, config.data.seq_len), jnp.int32)

    def init(initial: dict | None) -> TrainState:
        rng = jax.random.PRNGKey(config.train.seed)
        variables = model.init(rng, tokens_BxS, deterministic=True)
        variables = {**variables, **(initial or {})}
        params = variables["params"]
        return TrainState(
            params=params,
            opt_state=tx.init(params),
            moe_state=variables.get("moe_state", {}),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.fold_in(rng, 1),
            bad_steps=jnp.zeros((), jnp.int32),
        )

    if model.mesh is None:
        return jax.jit(init)(initial)
    return sharding.init_sharded(init, model.mesh, initial)


def cross_entropy(logits_BxSxV, targets_BxS, mask_BxS) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (nats) over the mask, and the number of masked-in tokens."""
    ce_BxS = optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, targets_BxS)
    mask_BxS = mask_BxS.astype(jnp.float32)
    return (ce_BxS * mask_BxS).sum(), mask_BxS.sum()


def check_trainable(model: Transformer) -> None:
    """Raises a `UserError` for a model that cannot be trained: quantized experts
    (`model.moe.expert_quantization`) have no gradients."""
    kind = model.config.moe.expert_quantization
    if kind is not None:
        raise UserError(
            f"model.moe.expert_quantization={kind!r}: quantized experts are for inference and "
            "cannot be trained; train the float model (expert_quantization: null) and quantize "
            "it afterwards (jmoe.compress.quantize.quantize_experts, or serve.py --quantize)"
        )


def make_train_step(model: Transformer, tx: optax.GradientTransformation):
    """`train_step(state, batch) -> (state, metrics)`, to be jitted.

    A step whose loss, gradient norm, updated parameters or MoE state are not all finite leaves
    params, optimizer and MoE state as they were and increments `bad_steps` (reset by the next
    finite step), so a checkpoint never holds an Inf or NaN weight.

    Raises:
      UserError: a model that cannot be trained (`check_trainable`).
    """
    check_trainable(model)
    model_config = model.config

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logits_BxSxV, stats = model.apply(
                {"params": params, "moe_state": state.moe_state},
                batch["inputs"],
                deterministic=False,
                token_mask_BxS=batch["mask"],
                segment_ids_BxS=batch.get("segment_ids"),
                rngs={"jitter": rng, "dropout": rng},
            )
            ce_sum, count = cross_entropy(logits_BxSxV, batch["targets"], batch["mask"])
            ce = ce_sum / jnp.maximum(count, 1.0)
            return ce + stats["aux_loss"], (ce, stats)

        (loss, (ce, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moe_state = update_moe_state(model_config, state.moe_state, stats)
        # A finite loss and gradient can still give Inf weights (a learning rate far too high).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        finite &= _all_finite(params) & _all_finite(moe_state)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            params=keep_if_finite(params, state.params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            moe_state=keep_if_finite(moe_state, state.moe_state),
            step=state.step + 1,
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        )
        metrics = {"loss": ce, "total_loss": loss, "grad_norm": grad_norm, **stats}
        metrics["param_norm"] = optax.tree.norm(new_state.params)
        metrics["bad_steps"] = new_state.bad_steps
        return new_state, metrics

    return train_step


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def make_eval_step(model: Transformer):
    """`eval_step(state, batch) -> (summed cross-entropy, token count)`, to be jitted."""

    def eval_step(state: TrainState, batch: dict):
        logits_BxSxV, _ = model.apply(
            {"params": state.params, "moe_state": state.moe_state},
            batch["inputs"],
            deterministic=True,
            token_mask_BxS=batch["mask"],
            segment_ids_BxS=batch.get("segment_ids"),
        )
        return cross_entropy(logits_BxSxV, batch["targets"], batch["mask"])

    return eval_step


def evaluate(eval_step, state: TrainState, batches: list[dict]) -> dict[str, float]:
    """Held-out loss (mean nats per token) and perplexity over `batches`."""
    total, count = 0.0, 0.0
    for ce_sum, n in jax.device_get([eval_step(state, batch) for batch in batches]):
        total, count = total + float(ce_sum), count + float(n)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}


def prepare_data(config: Config, workdir: str, resume: bool, say=lambda message: None):
    """Loads and splits the corpus and builds the tokenizer (saved into `workdir/tokenizer`; a
    resumed run loads that one), telling `say` about each. Returns `(tokenizer, train_docs,
    eval_docs)`."""
    cfg = config.data
    corpus = data.read_corpus(cfg.source, max_bytes=cfg.max_bytes)
    train_docs, eval_docs = data.split_documents(corpus.documents, cfg.eval_fraction, cfg.seed)
    say(
        f"data: {len(corpus.documents):,} documents, {corpus.bytes / 1e6:.2f} MB from "
        f"{cfg.source!r} ({len(train_docs):,} for training, {len(eval_docs):,} held out)"
    )
    if corpus.replaced:
        say(f"data: {corpus.replaced:,} bytes that are not UTF-8 were replaced by U+FFFD")
    saved = os.path.join(workdir, "tokenizer")
    started = time.perf_counter()
    if resume and os.path.exists(saved):
        tokenizer, origin = load_tokenizer(saved), "loaded from the run directory"
    elif config.model.init_from is not None:  # the checkpoint's, with its special tokens
        tokenizer = load_hf_tokenizer(config.model.init_from)
        origin = f"model.init_from={config.model.init_from}"
        if multihost.is_chief():
            shutil.rmtree(saved, ignore_errors=True)
            tokenizer.save(saved)
    else:
        if cfg.tokenizer == "bpe":
            say(f"tokenizer: training a {config.model.vocab_size}-symbol byte-level BPE...")
        cache = os.path.join(os.path.expanduser("~"), ".cache", "jmoe", "tokenizers")
        tokenizer = make_tokenizer(cfg.tokenizer, train_docs, config.model.vocab_size, cache)
        origin = f"data.tokenizer={cfg.tokenizer}"
        if multihost.is_chief():  # one writer; a stale tokenizer of another kind goes
            shutil.rmtree(saved, ignore_errors=True)
            tokenizer.save(saved)
    seconds = time.perf_counter() - started
    say(f"tokenizer: {tokenizer.vocab_size} symbols ({origin}, {seconds:.1f} s)")
    if tokenizer.vocab_size > config.model.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} symbols but model.vocab_size="
            f"{config.model.vocab_size}: set model.vocab_size={tokenizer.vocab_size} or more"
        )
    return tokenizer, train_docs, eval_docs


def make_mesh(config: Config) -> jax.sharding.Mesh | None:
    """The device mesh of `config.mesh` over every device of every process (`jmoe.sharding`),
    or None on a single device."""
    if jax.device_count() == 1:
        return None
    return sharding.make_mesh(config.mesh)
