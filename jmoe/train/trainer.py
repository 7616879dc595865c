"""Training: state, train_step, eval_step and `train_and_evaluate(config, workdir)`.

The loop: tokenise and split the corpus (`jmoe.data`), build `jmoe.model.Transformer`, then per
step one jitted `train_step` (token cross-entropy over the mask + the MoE aux losses, AdamW with
warmup + cosine, global-norm clipping, a non-finite guard that skips the update) followed by the
`moe_state` update (bias balancing, compute budget). Held-out evaluation, metrics, async
checkpoints and exact resumption happen around it. Everything runs from a notebook as well:

    >>> from jmoe.train.run_config import load_config
    >>> metrics = train_and_evaluate(load_config(None, ["train.steps=20"]), "/tmp/run")
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmoe import sharding
from jmoe.lm.model import Transformer, flops_per_token, update_moe_state
from jmoe.train import checkpoint, data, report
from jmoe.train.config import Config, TrainConfig
from jmoe.train.tokenizer import load_tokenizer, make_tokenizer

PER_LAYER_STATS = ("tokens_per_expert", "active_experts", "dropped_fraction", "router_entropy")


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


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `final_lr_fraction` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.final_lr_fraction,
    )


def decay_mask(params) -> Any:
    """True for the weights that get weight decay: matrices, not norm scales or biases (the
    router's selection bias lives in `moe_state` and is never optimised)."""

    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", k)).lower() for k in path]
        return leaf.ndim >= 2 and not any("norm" in n or "bias" in n for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decay masked by `decay_mask`) after optional global-norm clipping."""
    clip = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip else []
    return optax.chain(
        *clip,
        optax.adamw(
            learning_rate_schedule(train),
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        ),
    )


def init_state(config: Config, model: Transformer, tx: optax.GradientTransformation) -> TrainState:
    """Fresh parameters, optimizer and MoE state from `config.train.seed`, created under jit
    and, on a mesh (`model.mesh`), born sharded by `jmoe.sharding.param_shardings` (experts on
    "expert", large weights on "fsdp"; the optimizer moments like their parameters)."""
    batch = sharding.axis_size(model.mesh, sharding.BATCH_AXES)
    tokens_BxS = jnp.zeros((batch, config.data.seq_len), jnp.int32)

    def init() -> TrainState:
        rng = jax.random.PRNGKey(config.train.seed)
        variables = model.init(rng, tokens_BxS, deterministic=True)
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
        return jax.jit(init)()
    return sharding.init_sharded(init, model.mesh)


def cross_entropy(logits_BxSxV, targets_BxS, mask_BxS) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy (nats) over the mask, and the number of masked-in tokens."""
    ce_BxS = optax.softmax_cross_entropy_with_integer_labels(logits_BxSxV, targets_BxS)
    mask_BxS = mask_BxS.astype(jnp.float32)
    return (ce_BxS * mask_BxS).sum(), mask_BxS.sum()


def make_train_step(model: Transformer, tx: optax.GradientTransformation):
    """`train_step(state, batch) -> (state, metrics)`, to be jitted.

    A step whose loss or gradient norm is not finite leaves params, optimizer and MoE state as
    they were and increments `bad_steps` (reset by the next finite step).
    """
    model_config = model.config

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logits_BxSxV, stats = model.apply(
                {"params": params, "moe_state": state.moe_state},
                batch["inputs"],
                deterministic=False,
                token_mask_BxS=batch["mask"],
                rngs={"jitter": rng, "dropout": rng},
            )
            ce_sum, count = cross_entropy(logits_BxSxV, batch["targets"], batch["mask"])
            ce = ce_sum / jnp.maximum(count, 1.0)
            return ce + stats["aux_loss"], (ce, stats)

        (loss, (ce, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        moe_state = update_moe_state(model_config, state.moe_state, stats)

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
        metrics["bad_steps"] = new_state.bad_steps
        return new_state, metrics

    return train_step


def make_eval_step(model: Transformer):
    """`eval_step(state, batch) -> (summed cross-entropy, token count)`, to be jitted."""

    def eval_step(state: TrainState, batch: dict):
        logits_BxSxV, _ = model.apply(
            {"params": state.params, "moe_state": state.moe_state},
            batch["inputs"],
            deterministic=True,
            token_mask_BxS=batch["mask"],
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


def prepare_data(config: Config, workdir: str, resume: bool):
    """Loads and splits the corpus and builds the tokenizer (saved into `workdir/tokenizer`; a
    resumed run loads that one). Returns `(tokenizer, train_docs, eval_docs)`."""
    cfg = config.data
    docs = data.load_documents(cfg.source, max_bytes=cfg.max_bytes)
    train_docs, eval_docs = data.split_documents(docs, cfg.eval_fraction, cfg.seed)
    saved = os.path.join(workdir, "tokenizer")
    if resume and os.path.exists(saved):
        tokenizer = load_tokenizer(saved)
    else:
        cache = os.path.join(os.path.expanduser("~"), ".cache", "jmoe", "tokenizers")
        tokenizer = make_tokenizer(cfg.tokenizer, train_docs, config.model.vocab_size, cache)
        if jax.process_index() == 0:  # one writer; a stale tokenizer of another kind goes
            shutil.rmtree(saved, ignore_errors=True)
            tokenizer.save(saved)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(
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


def _put_batch(batch: dict, mesh: jax.sharding.Mesh | None) -> dict:
    """This process's NumPy batch as global arrays split over the mesh's batch axes."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    return sharding.shard_batch(batch, mesh)


def _per_process_batch(config: Config) -> int:
    batch, processes = config.data.batch_size, jax.process_count()
    if batch % processes:
        raise ValueError(
            f"data.batch_size={batch} is not a multiple of the {processes} processes: "
            f"use a multiple of {processes}"
        )
    return batch // processes


def _log_record(step: int, metrics: dict, lr: float, tokens_per_s: float, config: Config):
    """The metrics.jsonl line of a training step: scalars, per-MoE-layer stats and MFU
    (`bad_steps` > 0 marks a skipped non-finite step)."""
    record = {"step": step, "lr": lr, "tokens_per_s": tokens_per_s}
    for key, value in metrics.items():
        if key in PER_LAYER_STATS or np.ndim(value) == 0:
            record[key] = value  # made JSON by `report.MetricsLog`
    active = metrics.get("active_experts")
    flops = flops_per_token(config.model, config.data.seq_len, active_experts=active)
    record["flops_per_token"] = flops
    record["mfu"] = report.mfu(flops, tokens_per_s, jax.devices())
    return record


def train_and_evaluate(config: Config, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint when there is one).

    Writes `config.yaml`, `tokenizer/`, `checkpoints/`, `metrics.jsonl` and `report.png` there.

    Returns:
      Final metrics: `step`, `loss` (last train cross-entropy), `eval_loss`, `eval_perplexity`,
      `unigram_loss` (the held-out add-one unigram baseline), `tokens_per_s`, `wall_time_s`,
      `skipped_steps`.

    Raises:
      FloatingPointError: after `train.max_bad_steps` non-finite steps in a row (the last good
        checkpoint is kept).
    """
    wall_start = time.perf_counter()
    workdir = os.fspath(workdir)
    train_cfg = config.train
    resume = checkpoint.prepare_workdir(workdir, config)
    tokenizer, train_docs, eval_docs = prepare_data(config, workdir, resume)
    unigram = data.unigram_loss(train_docs, eval_docs, tokenizer)

    mesh = make_mesh(config)
    model = Transformer(config.model, mesh)
    tx = make_optimizer(train_cfg)
    state = init_state(config, model, tx)
    iterator_args = dict(seq_len=config.data.seq_len, batch_size=_per_process_batch(config))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    train_iter = data.make_iterator(
        train_docs,
        tokenizer,
        **iterator_args,
        **shard,
        seed=config.data.seed,
        prefetch=config.data.prefetch,
    )
    eval_iter = data.make_iterator(
        eval_docs, tokenizer, **iterator_args, **shard, seed=0, shuffle=False, num_epochs=1
    )
    eval_batches = [
        _put_batch(batch, mesh) for batch in itertools.islice(eval_iter, train_cfg.eval_batches)
    ]

    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, checkpoint.CHECKPOINT_DIR), max_to_keep=train_cfg.max_to_keep
    )
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if resume:
        state, data_state = ckpt.restore(state)
        train_iter.set_state(data_state)
    start_step = int(state.step)
    chief = jax.process_index() == 0
    log = report.MetricsLog(metrics_path, enabled=chief)
    log.truncate(start_step)

    train_step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model))
    schedule = learning_rate_schedule(train_cfg)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    progress = report.Progress(train_cfg.steps, start_step, train_cfg.progress and chief)
    final = {"step": start_step, "unigram_loss": unigram, "skipped_steps": 0}
    window_start, window_steps, tokens_per_s = time.perf_counter(), 0, 0.0
    try:
        for step in range(start_step + 1, train_cfg.steps + 1):
            state, metrics = train_step(state, _put_batch(next(train_iter), mesh))
            bad_steps = int(state.bad_steps)  # waits for the step
            final["skipped_steps"] += bad_steps > 0
            if step == start_step + 1:  # leave compilation out of the throughput
                window_start, window_steps = time.perf_counter(), 0
            else:
                window_steps += 1
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                elapsed = time.perf_counter() - window_start
                if window_steps:
                    tokens_per_s = window_steps * tokens_per_step / elapsed
                window_start, window_steps = time.perf_counter(), 0
                metrics = jax.device_get(metrics)
                log.write(
                    _log_record(step, metrics, float(schedule(step - 1)), tokens_per_s, config)
                )
                final["loss"] = float(metrics["loss"])
                progress.update(step, final["loss"], tokens_per_s)
            if bad_steps >= train_cfg.max_bad_steps:
                raise FloatingPointError(
                    f"{bad_steps} non-finite steps in a row (loss or gradient NaN/Inf) up to step "
                    f"{step}: stopping (train.max_bad_steps={train_cfg.max_bad_steps}). The last "
                    f"good checkpoint (step {ckpt.latest_step()}) is kept in {workdir}; check the "
                    "data, or lower train.learning_rate in a new workdir (a run directory only "
                    "resumes its own config)"
                )
            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                eval_start = time.perf_counter()
                final.update(evaluate(eval_step, state, eval_batches))
                log.write({"step": step, **{k: final[k] for k in ("eval_loss", "eval_perplexity")}})
                if chief:
                    progress.write(
                        f"step {step}: held-out loss {final['eval_loss']:.4f} "
                        f"(perplexity {final['eval_perplexity']:.2f}; unigram {unigram:.4f})"
                    )
                window_start += time.perf_counter() - eval_start  # evaluation is not training
            if bad_steps == 0 and (
                step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps
            ):
                ckpt.save(step, state, train_iter.get_state())
            final["step"] = step
    finally:
        progress.close()
        ckpt.wait()
        ckpt.close()
    if "eval_loss" not in final:
        final.update(evaluate(eval_step, state, eval_batches))
    final.update(tokens_per_s=tokens_per_s, wall_time_s=time.perf_counter() - wall_start)
    if train_cfg.plot and chief:
        report.plot_report(
            report.read_metrics(metrics_path), os.path.join(workdir, "report.png"), unigram
        )
    return final
