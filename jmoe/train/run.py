"""A training run: `train_and_evaluate(config, workdir)`.

It holds the run directory's lock (`run_lock`), reads the data and builds the tokenizer and the
model (`trainer`), resumes from the newest checkpoint that restores (`checkpoint`), then trains
step by step with metrics (`metrics`), held-out evaluation and async checkpoints, until
`train.steps`, a SIGTERM / SIGINT (`preemption`: a checkpoint at the current step, then
`RunStopped`) or `train.max_bad_steps` non-finite steps in a row (`Diverged`). It ends with
`report.png` and `summary.json`. `load_state` reads a run directory's config and newest state
back (to evaluate it, or to fine-tune from it with `init_params`). Everything runs from a
notebook as well:

    >>> from jmoe.train.run_config import load_config
    >>> final = train_and_evaluate(load_config(None, ["train.steps=20"]), "/tmp/run")
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jmoe import sharding
from jmoe.lm.model import Transformer
from jmoe.train import (
    checkpoint,
    data,
    init_from,
    metrics,
    multihost,
    preemption,
    report,
    run_lock,
)
from jmoe.train.config import Config
from jmoe.train.errors import UserError
from jmoe.train.run_config import load_config
from jmoe.train.trainer import (
    TrainState,
    evaluate,
    init_state,
    learning_rate_schedule,
    make_eval_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    prepare_data,
    schedule_end,
)


class Diverged(FloatingPointError):
    """`train.max_bad_steps` non-finite steps in a row stopped the run."""


def _put_batch(batch: dict, mesh: jax.sharding.Mesh | None) -> dict:
    """This process's NumPy batch as global arrays split over the mesh's batch axes."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    return sharding.shard_batch(batch, mesh)


def _make_inputs(config: Config, tokenizer, train_docs, eval_docs, mesh):
    """This process's endless training iterator and the held-out batches (on the devices)."""
    batch, processes = config.data.batch_size, jax.process_count()
    if batch % processes:
        raise UserError(
            f"data.batch_size={batch} is not a multiple of the {processes} processes: "
            f"use a multiple of {processes}"
        )
    common = dict(
        seq_len=config.data.seq_len,
        batch_size=batch // processes,
        shard_index=jax.process_index(),
        shard_count=processes,
    )
    train_iter = data.make_iterator(
        train_docs, tokenizer, **common, seed=config.data.seed, prefetch=config.data.prefetch
    )
    eval_iter = data.eval_iterator(eval_docs, tokenizer, **common)
    eval_batches = itertools.islice(eval_iter, config.train.eval_batches)
    return train_iter, [_put_batch(batch, mesh) for batch in eval_batches]


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike, *, init_params: Any = None
) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its newest checkpoint that restores.

    Writes `config.yaml`, `tokenizer/`, `checkpoints/`, `metrics.jsonl`, `tensorboard/`,
    `report.png` and `summary.json` there, holding the directory's lock meanwhile. A finished
    run (its checkpoint at `train.steps`) returns its saved summary at once; a larger
    `train.steps` continues it (see `learning_rate_schedule`).

    `init_params` (a "params" tree shaped like this config's, e.g. `load_state(other)[1].params`
    converted with `jmoe.with_null_experts`) starts a fresh run from those weights instead of
    the seeded initialisation, with a fresh optimizer and MoE state: fine-tuning from a jmoe
    run (`model.init_from` imports a Hugging Face checkpoint instead). A run that resumes from
    its own checkpoint ignores it.

    Returns:
      Final metrics: `step`, `loss` (last logged train cross-entropy), `eval_loss`,
      `eval_perplexity`, `unigram_loss` (the held-out add-one unigram baseline),
      `tokens_per_s` (None when no step was timed), `wall_time_s`, `skipped_steps`.

    Raises:
      UserError: a config, data source or run directory that cannot work (the message says
        what to change), a directory another run holds, no checkpoint that restores.
      RunStopped: SIGTERM or SIGINT stopped the run after saving a checkpoint at its `.step`.
      Diverged: after `train.max_bad_steps` non-finite steps in a row (the last good
        checkpoint is kept; `report.png` is written).
    """
    wall_start = time.perf_counter()
    workdir = os.fspath(workdir)
    checkpoint.check_run_directory(workdir)
    metrics.check_wandb(config.train)
    with run_lock.hold_run_directory(workdir):
        latest = checkpoint.prepare_workdir(workdir, config)
        summary = report.load_summary(workdir)
        if latest == config.train.steps and summary and summary.get("step") == latest:
            if multihost.is_chief():
                report.status(
                    f"{workdir} already finished step {latest} (train.steps={latest}): nothing "
                    "to do; raise train.steps to train on"
                )
            return summary
        return _train(config, workdir, latest, wall_start, init_params)


def load_state(workdir: str | os.PathLike) -> tuple[Config, TrainState]:
    """The config and the newest restorable train state of a run directory (on one device or
    the default mesh), e.g. to evaluate a finished run or to fine-tune from it."""
    workdir = os.fspath(workdir)
    config_path = os.path.join(workdir, checkpoint.CONFIG_FILE)
    if not os.path.exists(config_path):
        raise UserError(f"{workdir!r} is not a run directory: it has no {checkpoint.CONFIG_FILE}")
    config = load_config(config_path)
    model = Transformer(config.model, make_mesh(config))
    target = init_state(config, model, make_optimizer(config.train))
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    with checkpoint.Checkpointer(directory, max_to_keep=config.train.max_to_keep) as ckpt:
        return config, ckpt.restore_newest(target).state


def _start_from(params, fresh):
    """`params` placed like the freshly initialised `fresh` params; a different tree structure,
    shape or dtype is refused, naming the first mismatch."""
    fresh_paths = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
    given_paths = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    extra = [path for path in given_paths if path not in fresh_paths]
    for path in [*fresh_paths, *extra]:  # the model's order: the first mismatch is named
        old, new = fresh_paths.get(path), given_paths.get(path)
        if old is None or new is None or old.shape != new.shape or old.dtype != new.dtype:
            where = jax.tree_util.keystr(path)
            want = "absent" if old is None else f"{old.shape} {old.dtype}"
            got = "absent" if new is None else f"{new.shape} {new.dtype}"
            raise UserError(
                f"init_params{where} is {got} but this config's model has {want}: convert the "
                "weights to the new config first (e.g. jmoe.with_null_experts for a router "
                "with null experts)"
            )
    # A copy: the train step donates the state, which must not delete the caller's arrays.
    return jax.tree.map(
        lambda new, old: jax.device_put(new, old.sharding, may_alias=False), params, fresh
    )


def _train(
    config: Config, workdir: str, latest: int | None, wall_start: float, init_params: Any
) -> dict:
    train_cfg, chief = config.train, multihost.is_chief()
    say = report.status if chief else _quiet
    tokenizer, train_docs, eval_docs = prepare_data(config, workdir, latest is not None, say)
    unigram = data.unigram_loss(train_docs, eval_docs, tokenizer)
    mesh = make_mesh(config)
    train_iter, eval_batches = _make_inputs(config, tokenizer, train_docs, eval_docs, mesh)
    model = Transformer(config.model, mesh)
    initial = None
    if latest is None and config.model.init_from is not None:
        say(f"model: reading the weights of model.init_from={config.model.init_from}...")
        initial = init_from.initial_variables(config.model, mesh)
    say("model: initialising the parameters...")
    # no schedule shapes the state
    state = init_state(config, model, make_optimizer(train_cfg), initial)
    if init_params is not None and latest is None:  # zero moments fit any weights
        state = state.replace(params=_start_from(init_params, state.params))
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    with checkpoint.Checkpointer(directory, max_to_keep=train_cfg.max_to_keep) as ckpt:
        decay_steps = train_cfg.steps
        if latest is not None:
            restored = ckpt.restore_newest(state)
            state, decay_steps = restored.state, restored.json_state["decay_steps"]
            train_iter.set_state(restored.json_state["data"])
            say(f"resuming from the checkpoint of step {restored.step}")
        end = schedule_end(train_cfg, decay_steps)
        if train_cfg.steps > end:
            final_lr = train_cfg.learning_rate * train_cfg.final_lr_fraction
            say(
                f"steps {end + 1} to {train_cfg.steps} train at the final learning rate "
                f"{final_lr:g}: this run directory's schedule ends at step {end}"
            )
        tx = make_optimizer(train_cfg, decay_steps)
        session = _Session(
            config=config,
            workdir=workdir,
            say=say,
            ckpt=ckpt,
            log=metrics.open_metrics(workdir, config, int(state.step), enabled=chief),
            train_iter=train_iter,
            eval_batches=eval_batches,
            mesh=mesh,
            train_step=jax.jit(make_train_step(model, tx), donate_argnums=0),
            eval_step=jax.jit(make_eval_step(model)),
            schedule=jax.jit(learning_rate_schedule(train_cfg, decay_steps)),
            decay_steps=decay_steps,
            unigram=unigram,
        )
        n_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
        say(f"model: {n_params:,} parameters; compiling the training step...")
        try:
            final = session.train(state)
        except (preemption.RunStopped, Diverged):
            _plot(config, workdir, unigram, chief)
            raise
        finally:
            session.log.close()
    final["wall_time_s"] = time.perf_counter() - wall_start
    _plot(config, workdir, unigram, chief)
    if chief:
        report.save_summary(workdir, final)
    return final


def _quiet(message: str) -> None:
    """`say` on processes other than 0."""


@dataclasses.dataclass
class _Session:
    """The step loop of one process's run, from the state it starts at to `train.steps`."""

    config: Config
    workdir: str
    say: Callable[[str], None]
    ckpt: checkpoint.Checkpointer
    log: metrics.MetricsWriters
    train_iter: Any
    eval_batches: list[dict]
    mesh: jax.sharding.Mesh | None
    train_step: Callable
    eval_step: Callable
    schedule: Callable
    decay_steps: int
    unigram: float

    def train(self, state) -> dict:
        """Trains up to `train.steps`; returns the final metrics (`wall_time_s` aside).

        Raises:
          RunStopped: after a signal, with a checkpoint at the step it stopped at.
          Diverged: after `train.max_bad_steps` non-finite steps in a row.
        """
        train_cfg = self.config.train
        start_step = int(state.step)
        throughput = report.Throughput(self.config.data.batch_size * self.config.data.seq_len)
        final = {"step": start_step, "unigram_loss": self.unigram, "skipped_steps": 0}
        progress, tokens_per_s = None, None
        try:
            with preemption.StopRequests() as stop:
                for step in range(start_step + 1, train_cfg.steps + 1):
                    step_start = time.perf_counter()
                    batch = _put_batch(next(self.train_iter), self.mesh)
                    state, step_metrics = self.train_step(state, batch)
                    bad_steps = int(state.bad_steps)  # waits for the step
                    seconds = time.perf_counter() - step_start
                    if progress is None:  # it compiled: leave it out of the throughput
                        self.say(f"step {step} took {seconds:.1f} s (compiling)")
                        enabled = train_cfg.progress and multihost.is_chief()
                        progress = report.Progress(train_cfg.steps, step, enabled)
                    else:
                        throughput.add(seconds)
                    final["skipped_steps"] += bad_steps > 0
                    if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                        tokens_per_s = throughput.window() or tokens_per_s
                        final["loss"] = self._log_step(step, step_metrics, tokens_per_s)
                        progress.update(step, final["loss"], tokens_per_s)
                    if bad_steps >= train_cfg.max_bad_steps:
                        raise Diverged(self._divergence_message(step, bad_steps))
                    if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                        final.update(self._evaluate(state, step))
                    final["step"] = step
                    due = step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps
                    signum = stop.requested() if step < train_cfg.steps else None
                    if (bad_steps == 0 and due) or signum is not None:
                        self._save(step, state)
                    if signum is not None:
                        raise preemption.RunStopped(step, signum)
        finally:
            if progress is not None:
                progress.close()
        if "eval_loss" not in final:  # no step ran: resumed at the last step
            final.update(self._evaluate(state, start_step))
        final["tokens_per_s"] = throughput.overall()
        return final

    def _save(self, step: int, state) -> None:
        json_state = {"data": self.train_iter.get_state(), "decay_steps": self.decay_steps}
        self.ckpt.save(step, state, json_state)

    def _log_step(self, step: int, step_metrics: dict, tokens_per_s: float | None) -> float:
        """Writes the step's metrics line; returns its train loss."""
        step_metrics = jax.device_get(step_metrics)
        lr = float(self.schedule(step - 1))
        self.log.write(metrics.step_record(step, step_metrics, lr, tokens_per_s, self.config))
        return float(step_metrics["loss"])

    def _evaluate(self, state, step: int) -> dict:
        held_out = evaluate(self.eval_step, state, self.eval_batches)
        self.log.write({"step": step, **held_out})
        self.say(
            f"step {step}: held-out loss {held_out['eval_loss']:.4f} (perplexity "
            f"{held_out['eval_perplexity']:.2f}; unigram {self.unigram:.4f})"
        )
        return held_out

    def _divergence_message(self, step: int, bad_steps: int) -> str:
        train_cfg, last_good, kept = self.config.train, step - bad_steps, self.ckpt.latest_step()
        where = (
            f"the newest checkpoint, step {kept}, is kept in {self.workdir}"
            if kept is not None
            else "no checkpoint was saved before it"
        )
        return (
            f"{bad_steps} non-finite steps in a row (loss, gradient or updated weights NaN or "
            f"Inf), steps {last_good + 1} to {step}: stopping (train.max_bad_steps="
            f"{train_cfg.max_bad_steps}). The last good step is {last_good}; {where}. Lower the "
            f"learning rate, e.g. train.learning_rate={train_cfg.learning_rate / 10:g}, in a "
            "new run directory (this one only resumes its own config), or check the data"
        )


def _plot(config: Config, workdir: str, unigram: float, chief: bool) -> None:
    """Writes report.png from metrics.jsonl (process 0, when `train.plot`)."""
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if config.train.plot and chief and os.path.exists(path):
        report.plot_report(metrics.read_metrics(path), os.path.join(workdir, "report.png"), unigram)
