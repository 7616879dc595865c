"""What merging experts costs in held-out loss: a tiny MoE language model, briefly trained on
bytes of the embedded corpus, merged to fewer experts per layer (MC-SMoE,
`jmoe.compress.merge`), against two baselines at the same expert count: keeping only the most
used experts, and merging without the hidden-unit alignment.

Calibration sequences come from the training documents, held-out ones from documents the model
never saw. The table gives each variant's held-out cross-entropy (nats per byte) and routed
expert memory; JSON goes to bench/results/merge_experts.json.

    python bench/merge_experts.py                                   # CPU-sized default
    python bench/merge_experts.py --steps 2000 --d 128 --f 256 --experts 16 --groups 12 8 4
"""

from __future__ import annotations

import argparse
import platform
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from results_io import write_results

import jmoe
from jmoe.compress import merge, surgery, trace
from jmoe.train.data import load_documents
from jmoe.train.trainer import cross_entropy


def _windows(docs: list[str], num: int, seq_len: int, rng) -> np.ndarray:
    """`[num, seq_len + 1]` random windows of the documents' UTF-8 bytes."""
    stream = np.frombuffer("\n".join(docs).encode(), np.uint8).astype(np.int32)
    starts = rng.integers(0, stream.size - seq_len - 1, num)
    return np.stack([stream[s : s + seq_len + 1] for s in starts])


def _mean_loss(config: jmoe.ModelConfig, variables: dict, windows: np.ndarray) -> float:
    @jax.jit
    def loss(variables, window_BxS1):
        logits, _ = jmoe.Transformer(config).apply(variables, window_BxS1[:, :-1])
        total, count = cross_entropy(logits, window_BxS1[:, 1:], jnp.ones(logits.shape[:2]))
        return total / count

    return float(np.mean([loss(variables, w) for w in np.split(windows, len(windows) // 8)]))


def _train(config, windows_fn, steps: int, lr: float, seed: int) -> dict:
    model = jmoe.Transformer(config)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(windows_fn()[:, :-1]))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps), 0.1)
    params, opt_state = variables["params"], tx.init(variables["params"])
    rest = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def step(params, opt_state, window_BxS1):
        def loss_fn(params):
            logits, stats = model.apply({**rest, "params": params}, window_BxS1[:, :-1])
            total, count = cross_entropy(logits, window_BxS1[:, 1:], jnp.ones(logits.shape[:2]))
            return total / count + stats["aux_loss"]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(windows_fn()))
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(f"step {i:5d} train loss {float(loss):.3f}")
    return {**rest, "params": params}


def _keep_most_used(config, variables, tokens_BxS, num_groups: int):
    """Baseline: each MoE layer keeps its `num_groups` most used experts, drops the others."""
    routings = trace.layer_routings(config, variables, tokens_BxS)
    mask_T = np.ones(tokens_BxS.size, bool)
    layers = []
    for w in surgery.moe_layer_weights(config, variables):
        usage_E = merge.expert_usage(routings[w.layer], mask_T, config.moe.num_experts)
        keep = np.sort(np.argsort(-usage_E, kind="stable")[:num_groups])
        layers.append(surgery.take_experts(w, keep))
    return surgery.with_experts(config, variables, layers)


def _merge_unaligned(config, variables, tokens_BxS, num_groups: int):
    """Ablation: MC-SMoE merging with every member's hidden units left in their own order."""

    def identity(dominant, member):
        return np.arange(config.moe.d_ff)

    with mock.patch.object(merge, "match_hidden_units", identity):
        return merge.merge_experts(config, variables, tokens_BxS, None, num_groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--f", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--groups", type=int, nargs="+", default=[6, 4, 2])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences")
    parser.add_argument("--held-out", type=int, default=128, help="held-out sequences")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    docs = load_documents("stdlib", max_bytes=3_000_000)
    train_docs, eval_docs = docs[: -len(docs) // 10], docs[-len(docs) // 10 :]
    rng = np.random.default_rng(args.seed)
    moe = jmoe.MoEConfig(
        d_model=args.d, d_ff=args.f, num_experts=args.experts, router=jmoe.TopK(k=args.k)
    )
    config = jmoe.ModelConfig(
        vocab_size=256, d_model=args.d, n_layers=args.layers, n_heads=4, d_ff=2 * args.d, moe=moe
    )
    variables = _train(
        config, lambda: _windows(train_docs, args.batch, args.seq, rng), args.steps, args.lr,
        args.seed,
    )  # fmt: skip
    calibration = jnp.asarray(_windows(train_docs, args.calibration, args.seq, rng)[:, :-1])
    held_out = _windows(eval_docs, args.held_out - args.held_out % 8, args.seq, rng)

    def row(method, groups, config, variables):
        loss = _mean_loss(config, variables, held_out)
        mib = surgery.expert_param_bytes(config, variables) / 2**20
        return dict(method=method, experts=groups, expert_mib=mib, held_out_loss=loss)

    rows = [row("original", args.experts, config, variables)]
    methods = {
        "merge (MC-SMoE)": lambda g: merge.merge_experts(config, variables, calibration, None, g),
        "merge, no alignment": lambda g: _merge_unaligned(config, variables, calibration, g),
        "keep most used": lambda g: _keep_most_used(config, variables, calibration, g),
    }
    for groups in args.groups:
        for method, fn in methods.items():
            rows.append(row(method, groups, *fn(groups)))

    base = rows[0]["held_out_loss"]
    print(
        f"tiny byte-level LM (D={args.d} F={args.f} L={args.layers} E={args.experts} "
        f"k={args.k}, {args.steps} steps), held-out loss in nats/byte on {jax.default_backend()}"
    )
    print(f"{'method':22s} {'experts':>7s} {'expert MiB':>10s} {'loss':>7s} {'vs original':>11s}")
    for r in rows:
        print(
            f"{r['method']:22s} {r['experts']:7d} {r['expert_mib']:10.3f} "
            f"{r['held_out_loss']:7.3f} {r['held_out_loss'] - base:+11.3f}"
        )
    write_results(
        "bench/results/merge_experts.json",
        {"args": vars(args), "machine": platform.machine(), "rows": rows},
    )


if __name__ == "__main__":
    main()
