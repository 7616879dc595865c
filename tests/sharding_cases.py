"""Expert-parallel checks on 8 host CPU devices, run in a subprocess by test_expert_parallel.py.

`python tests/sharding_cases.py NAME...` runs the named cases (functions `case_NAME`) and exits
non-zero after printing the traceback of any that fails. The device count is a process-wide
setting fixed when JAX starts, so these cases live outside the in-process suite.
"""

import dataclasses
import os
import sys
import time
import traceback

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jmoe  # noqa: E402
import moe_reference as ref  # noqa: E402
from jmoe import sharding  # noqa: E402
from jmoe.sharding import MeshConfig  # noqa: E402

if "JMOE_JAX_CACHE" in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.environ["JMOE_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

D, F, B, S = 8, 16, 4, 8  # T = 32 tokens: 4 per device on 8 batch shards
LOSS_COEFS = dict(lb_coef=0.1, z_loss_coef=0.01, entropy_coef=0.01)
MESHES = {
    "1x8": MeshConfig(data=1, expert=8),
    "2x4": MeshConfig(data=2, expert=4),
    "4x2": MeshConfig(data=4, expert=2),
    "fsdp": MeshConfig(data=2, fsdp=2, expert=2),
    "tensor": MeshConfig(data=2, expert=2, tensor=2),
    "data8": MeshConfig(data=8, expert=1),  # a mesh without expert parallelism
}


def _setup(cfg, bias=None, seed=0):
    x = jax.random.normal(jax.random.key(seed), (B, S, D))
    variables = jax.jit(jmoe.MoE(cfg).init)(jax.random.key(seed + 1), x)
    if bias is not None:
        variables = {**variables, "moe_state": {"bias": jnp.asarray(bias, jnp.float32)}}
    return x, variables


def _step_fn(model):
    """jit of (params, x) -> ((loss, (y, stats)), grads): every output the layer has."""
    ct = jax.random.normal(jax.random.key(7), (B, S, D))

    def loss(variables, params, x, mask):
        y, stats = model.apply({**variables, "params": params}, x, token_mask=mask)
        return jnp.sum(y * ct) + stats["aux_loss"], (y, stats)

    return jax.jit(jax.value_and_grad(loss, (1, 2), has_aux=True))


def _compare(cfg, mesh_names, *, bias=None, mask=None, atol=2e-5):
    """The layer on each mesh equals the one-device layer: outputs, stats, grads, state update."""
    x, variables = _setup(cfg, bias)
    (loss0, (y0, s0)), g0 = _step_fn(jmoe.MoE(cfg))(variables, variables["params"], x, mask)
    for mesh_name in mesh_names:
        _compare_on(cfg, mesh_name, x, variables, mask, atol, (loss0, y0, s0, g0))
    return s0


def _compare_on(cfg, mesh_name, x, variables, mask, atol, want):
    loss0, y0, s0, g0 = want
    mesh = sharding.make_mesh(MESHES[mesh_name])
    sharded = sharding.shard_params(variables, mesh)
    args = (sharded, sharded["params"], x, mask)
    step = _step_fn(jmoe.MoE(cfg, mesh=mesh)).lower(*args).compile()
    (loss1, (y1, s1)), g1 = step(*args)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=atol, err_msg=f"y on {mesh_name}")
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5, err_msg=f"loss on {mesh_name}")
    assert s1.keys() == s0.keys()
    for key in s0:
        np.testing.assert_allclose(s1[key], s0[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g0), jax.tree.leaves(g1)
    ):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=atol, err_msg=f"grad {path[0]}")
    state0 = jmoe.update_state(cfg, variables.get("moe_state", {}), s0)
    state1 = jmoe.update_state(cfg, sharded.get("moe_state", {}), s1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-7), state0, state1)
    hlo = step.as_text()
    assert ("all-to-all" in hlo) == (mesh.shape["expert"] > 1), f"all-to-all on {mesh_name}"


def _cfg(**kw):
    return jmoe.MoEConfig(d_model=D, d_ff=F, **{**LOSS_COEFS, **kw})


def case_top_k_meshes():
    cfg = _cfg(
        num_experts=8,
        num_shared=1,
        shared_gate=True,
        router=jmoe.TopK(k=2, bias_update_rate=0.01, seq_balance_coef=0.1),
    )
    bias = 0.2 * np.arange(8) % 0.5
    mask = jnp.arange(B * S).reshape(B, S) % 7 != 3
    _compare(cfg, ["1x8", "4x2", "fsdp", "data8"], bias=bias)
    _compare(cfg, ["2x4"], bias=bias, mask=mask)


def case_sigmoid_groups_fsdp():
    cfg = _cfg(
        num_experts=8,
        router=jmoe.TopK(
            k=2, score="sigmoid", n_groups=4, top_groups=2, scale=2.5, seq_balance_coef=0.1
        ),
    )
    _compare(cfg, ["fsdp"], bias=0.3 * np.sin(np.arange(8)))


def case_expert_biases():
    """GPT-OSS's layer: router and expert biases, clamped SwiGLU, biases split with their experts
    (and over "tensor"), and with null experts (no bias in their empty slots)."""
    gpt_oss = dict(router_bias=True, expert_bias=True, activation="clamped_swiglu")
    for cfg in (
        _cfg(num_experts=8, router=jmoe.TopK(k=2), swiglu_limit=1.0, **gpt_oss),
        _cfg(num_experts=8, router=jmoe.NullExperts(k=3, num_null=4), **gpt_oss),
    ):
        x, variables = _setup(cfg)
        params = jax.tree_util.tree_map_with_path(
            lambda path, a: a + 0.3 if "b_" in jax.tree_util.keystr(path) else a,
            variables["params"],
        )
        params["router"]["bias"] = 0.5 * jnp.sin(jnp.arange(params["router"]["bias"].shape[0]))
        mesh = sharding.make_mesh(MESHES["tensor"])
        specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(params, mesh))
        assert specs["experts"]["b_up"] == jax.sharding.PartitionSpec("expert", "tensor")
        assert specs["experts"]["b_down"] == jax.sharding.PartitionSpec("expert", None)
        variables = {**variables, "params": params}
        want = _reference(cfg, x, variables)
        for mesh_name in ("tensor", "2x4", "1x8"):
            _compare_on(cfg, mesh_name, x, variables, None, 2e-5, want)


def case_quantized_experts():
    """int8 experts (forward only): the column scales are split with their experts, and over
    "tensor" with F for the input projections; the sharded layer equals the one-device one."""
    cfg = _cfg(num_experts=8, router=jmoe.TopK(k=2), expert_bias=True, expert_quantization="int8")
    x, variables = _setup(cfg)
    y0, _ = jax.jit(jmoe.MoE(cfg).apply)(variables, x)
    for mesh_name in ("tensor", "2x4"):
        mesh = sharding.make_mesh(MESHES[mesh_name])
        sharded = sharding.shard_params(variables, mesh)
        if mesh_name == "tensor":
            specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(sharded, mesh))
            want = jax.sharding.PartitionSpec("expert", "tensor")
            assert specs["params"]["experts"]["w_up_scale"] == want
        y1, _ = jax.jit(jmoe.MoE(cfg, mesh=mesh).apply)(sharded, x)
        np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=2e-5, err_msg=f"y on {mesh_name}")


def _reference(cfg, x, variables):
    (loss0, (y0, s0)), g0 = _step_fn(jmoe.MoE(cfg))(variables, variables["params"], x, None)
    return loss0, y0, s0, g0


def case_null_experts():
    cfg = _cfg(num_experts=8, router=jmoe.NullExperts(k=3, num_null=4))
    stats = _compare(cfg, ["2x4"])
    assert 0 < float(stats["active_experts"]) < 3, "some null picks are never sent"


def case_top_p():
    cfg = _cfg(num_experts=8, router=jmoe.TopP(p=0.5, max_k=4))
    _compare(cfg, ["4x2"])


def case_chain_of_experts():
    cfg = _cfg(
        num_experts=8, chain_steps=2, chain_residual="coe", num_shared=1, router=jmoe.TopK(k=2)
    )
    _compare(cfg, ["tensor"])  # expert hidden width split too


def case_skewed_to_one_device():
    """Every token picks experts 0 and 1, both on the first expert device; others get none."""
    cfg = _cfg(num_experts=8, router=jmoe.TopK(k=2))
    stats = _compare(cfg, ["2x4"], bias=np.where(np.arange(8) < 2, 50.0, 0.0))
    np.testing.assert_array_equal(stats["tokens_per_expert"], [B * S] * 2 + [0] * 6)


def _per_shard_reference(cfg, variables, x, shards):
    """Ids, kept mask and output with the capacity rule applied to each token shard alone."""
    x_TxD = np.asarray(x).reshape(-1, D)
    logits = x_TxD @ np.asarray(variables["params"]["router"]["kernel"])
    bias = np.asarray(variables["moe_state"]["bias"])
    ids, _, _ = ref.ref_top_k(logits, cfg.router.k, normalize=cfg.router.normalize, bias=bias)
    t_l = x_TxD.shape[0] // shards
    capacity = cfg.capacity(t_l, deterministic=True)
    kept = np.concatenate(
        [
            ref.ref_capacity(ids[i * t_l : (i + 1) * t_l], cfg.num_experts, capacity)
            for i in range(shards)
        ]
    )
    y = ref.ref_moe(variables["params"], x_TxD, dataclasses.asdict(cfg), ids, kept)
    return kept, np.asarray(y).reshape(x.shape)


def _check_capacity(cfg, mesh_name, bias=None):
    x, variables = _setup(cfg, bias)
    mesh = sharding.make_mesh(MESHES[mesh_name])
    shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
    kept, want_y = _per_shard_reference(cfg, variables, x, shards)
    y, stats = jax.jit(jmoe.MoE(cfg, mesh=mesh).apply)(sharding.shard_params(variables, mesh), x)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=2e-5, err_msg=mesh_name)
    want_dropped = 1.0 - kept.sum() / kept.size
    np.testing.assert_allclose(stats["dropped_fraction"], want_dropped, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats["active_experts"], kept.sum(-1).mean(), rtol=1e-6)
    return want_dropped


def case_capacity_overflow():
    cfg = _cfg(num_experts=8, capacity_factor=1.0, router=jmoe.TopK(k=2))
    assert _check_capacity(cfg, "1x8") > 0
    assert _check_capacity(cfg, "2x4") > 0
    skewed = _check_capacity(cfg, "4x2", bias=np.where(np.arange(8) < 2, 50.0, 0.0))
    # capacity ceil(1.0 * 2 * 4 / 8) = 1 per expert per shard: 2 of the 8 slots of a shard kept
    np.testing.assert_allclose(skewed, 1 - 2 / 8)


def _raises(exc, fn, *needles):
    try:
        fn()
    except exc as e:
        missing = [n for n in needles if n not in str(e)]
        assert not missing, f"{exc.__name__} message {str(e)!r} lacks {missing}"
        return
    raise AssertionError(f"no {exc.__name__} raised")


def case_bad_meshes():
    _raises(ValueError, lambda: sharding.make_mesh(MeshConfig(data=3, expert=2)), "6", "8")
    _raises(ValueError, lambda: sharding.make_mesh(MeshConfig(data=None, expert=3)), "3", "8")
    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
    x = jnp.ones((B, S, D))
    cfg = _cfg(num_experts=6)
    _raises(ValueError, lambda: jmoe.MoE(cfg, mesh=mesh).init(jax.random.key(0), x), "6", "4")
    ec = _cfg(num_experts=8, router=jmoe.ExpertChoice(allow_noncausal=True))
    _raises(NotImplementedError, lambda: jmoe.MoE(ec, mesh=mesh).init(jax.random.key(0), x))
    odd = jnp.ones((3, 3, D))  # 9 tokens over 8 batch shards
    _raises(ValueError, lambda: jmoe.MoE(_cfg(), mesh=mesh).init(jax.random.key(0), odd), "9", "8")


def case_param_shardings():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    cfg = _cfg(num_experts=4, num_shared=1)
    _, variables = _setup(cfg)
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(variables, mesh))
    P = jax.sharding.PartitionSpec
    assert specs["params"]["experts"]["w_gate"] == P("expert", "fsdp", "tensor")
    assert specs["params"]["experts"]["w_down"] == P("expert", "tensor", "fsdp")
    assert specs["params"]["shared"]["w_up"] == P("fsdp", "tensor")
    assert specs["params"]["router"]["kernel"] == P()
    assert specs["moe_state"]["bias"] == P()
    stacked = {"stacks_0": {"block_0": {"experts": {"w_up": jnp.zeros((3, 4, 8, 16))}}}}
    spec = sharding.param_shardings(stacked, mesh)["stacks_0"]["block_0"]["experts"]["w_up"].spec
    assert spec == P(None, "expert", "fsdp", "tensor")  # scan_layers' leading layer axis
    assert sharding.process_batch_slice(16, mesh) == slice(0, 16)  # one process holds all
    _raises(ValueError, lambda: sharding.process_batch_slice(6, mesh), "6", "4")


def case_train_steps():
    """Three trainer steps of a tiny MoE LM (bias balancing on) on two meshes equal one device:
    losses, parameters and moe_state."""
    from jmoe.lm.model import Transformer
    from jmoe.train import trainer
    from jmoe.train.run_config import load_config

    overrides = [
        "model.vocab_size=64",
        "model.d_model=16",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.d_ff=32",
        "model.max_seq_len=16",
        "model.moe.d_ff=16",
        "model.moe.router.bias_update_rate=0.01",
        "data.seq_len=16",
        "data.batch_size=8",
        "train.warmup_steps=0",
    ]
    cfg = load_config(None, overrides)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        tokens = rng.integers(0, 64, size=(8, 17), dtype=np.int32)
        batches.append(
            {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": tokens[:, 1:] > 3}
        )

    def run(mesh):
        model = Transformer(cfg.model, mesh)
        tx = trainer.make_optimizer(cfg.train)
        state = trainer.init_state(cfg, model, tx)
        step = jax.jit(trainer.make_train_step(model, tx))
        losses = []
        for batch in batches:
            batch = (
                jax.tree.map(jnp.asarray, batch)
                if mesh is None
                else sharding.shard_batch(batch, mesh)
            )
            state, metrics = step(state, batch)
            losses.append(float(metrics["total_loss"]))
        return np.array(losses), state

    want_losses, want = run(None)
    for mesh_config in (MeshConfig(data=2, expert=4), MeshConfig(data=2, fsdp=2, expert=2)):
        losses, got = run(sharding.make_mesh(mesh_config))
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=str(mesh_config))
        for tree in ("params", "moe_state"):
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                getattr(got, tree),
                getattr(want, tree),
            )
    assert float(np.abs(np.asarray(want.moe_state["layers_0"]["moe"]["bias"])).sum()) > 0


def main(names):
    failed = []
    for name in names:
        start = time.process_time()
        try:
            globals()[f"case_{name}"]()
            print(f"{name}: ok ({time.process_time() - start:.1f} s cpu)", flush=True)
        except Exception:
            failed.append(name)
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
