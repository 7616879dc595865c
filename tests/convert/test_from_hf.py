"""`jmoe.convert.from_hf` against transformers' own logits (tests/fixtures/hf/*/reference.npz,
written by tests/fixtures/hf/make_fixtures.py): the full forward, cached decode, both expert
layouts, the scanned layout and a mesh."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmoe.convert import from_hf
from jmoe.lm.model import Transformer, init_cache

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "hf"
FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"]
# The other expert layout of each fixture: one tensor per expert, or MXFP4 blocks (GPT-OSS).
OTHER_LAYOUT = {f: f"{f}_per_expert" for f in FAMILIES} | {"gpt_oss": "gpt_oss_mxfp4"}
TOL = 1e-4


def fixture(family):
    path = FIXTURES / family
    if not (path / "config.json").exists():
        pytest.skip(f"no fixture {path}: run tests/fixtures/hf/make_fixtures.py {family}")
    return path, dict(np.load(path / "reference.npz"))


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def load(family, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = from_hf(fixture(family)[0], **kwargs)
        return cache[key]

    return load


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_transformers(family, loaded):
    _, ref = fixture(family)
    config, variables = loaded(family)
    logits, _ = jax.jit(Transformer(config).apply)(variables, jnp.asarray(ref["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=TOL, rtol=0)


def cached_decode(config, variables, ref):
    """Prefill of the prompt then one greedy token at a time, as the reference was made."""
    model, prompt = Transformer(config), jnp.asarray(ref["input_ids"][:, : ref["prompt_len"]])
    b, p = prompt.shape
    cache = init_cache(config, b, p + ref["decode_ids"].shape[1])
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    step = jax.jit(lambda t, pos, c: model.apply(variables, t, pos, c, method=model.decode))
    logits, cache = step(prompt, positions, cache)
    out = [logits[:, -1]]
    for j in range(ref["decode_ids"].shape[1]):
        token = jnp.asarray(ref["decode_ids"][:, j : j + 1])
        logits, cache = step(token, jnp.full((b, 1), p + j), cache)
        out.append(logits[:, -1])
    return np.stack(out, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_transformers(family, loaded):
    _, ref = fixture(family)
    config, variables = loaded(family)
    logits = cached_decode(config, variables, ref)
    np.testing.assert_allclose(logits, ref["decode_logits"], atol=TOL)
    # the greedy tokens the reference fed are the argmax of the logits before them
    assert (ref["decode_logits"][:, :-1].argmax(-1) == ref["decode_ids"]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_layouts_import_identically(family, loaded):
    fused_dir, _ = fixture(family)
    per_expert_dir = FIXTURES / OTHER_LAYOUT[family]
    fused_config, fused = loaded(family)
    config, per_expert = from_hf(per_expert_dir)
    assert config == fused_config
    jax.tree.map(np.testing.assert_array_equal, per_expert, fused)


def test_scanned_layout_gives_the_same_logits(loaded):
    _, ref = fixture("qwen3_moe")  # dense and MoE layers alternate: two kinds of scan units
    config, variables = loaded("qwen3_moe")
    scan_config, scanned = loaded("qwen3_moe", scan_layers=True)
    assert scan_config.scan_layers and "stacks_0" in scanned["params"]
    tokens = jnp.asarray(ref["input_ids"])
    expected, _ = jax.jit(Transformer(config).apply)(variables, tokens)
    logits, _ = jax.jit(Transformer(scan_config).apply)(scanned, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)


def test_dtype_casts_every_parameter(loaded):
    config, variables = loaded("mixtral", dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {jnp.dtype("bfloat16")}
    _, reference = loaded("mixtral")
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(a, b.astype(jnp.bfloat16)),
        variables["params"],
        reference["params"],
    )


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jmoe import sharding
from jmoe.convert import from_hf
from jmoe.lm.model import Transformer
mesh = sharding.make_mesh(sharding.MeshConfig(data=2, expert=2, tensor=2))
ref = np.load("{path}/reference.npz")
for scan in (False, True):
    config, variables = from_hf("{path}", mesh=mesh, scan_layers=scan)
    want = sharding.param_shardings(variables, mesh)
    for leaf, target in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
        assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (leaf.sharding, target)
    logits, _ = Transformer(config).apply(variables, ref["input_ids"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol={tol})
print("mesh: ok")
"""


@pytest.mark.slow  # a fresh process with 8 devices: its compiles dominate
def test_loads_onto_a_mesh_with_the_parameter_shardings():
    path, _ = fixture("mixtral")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    script = MESH_SCRIPT.format(path=path, tol=TOL)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "mesh: ok" in result.stdout, result.stderr[-3000:]


def test_deepseek_fp8_weights_and_mtp_layer(tmp_path, caplog):
    """An FP8 block-scaled weight is dequantised on load; the multi-token-prediction layer
    (index == num_hidden_layers) is skipped with a log line."""
    import json
    import shutil

    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from jmoe.convert.quant import dequantize_fp8_blocks

    path = tmp_path / "fp8"
    shutil.copytree(fixture("deepseek_v3")[0], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [8, 8],
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.self_attn.q_a_proj.weight"  # [16, 32]: 2 x 4 blocks
    w8 = tensors[name].astype(ml_dtypes.float8_e4m3fn)
    scale = np.random.default_rng(0).uniform(0.5, 2.0, (2, 4)).astype(np.float32)
    tensors[name], tensors[f"{name}_scale_inv"] = w8, scale
    tensors["model.layers.3.eh_proj.weight"] = np.zeros((32, 64), np.float32)
    save_file(tensors, path / "model.safetensors")
    with caplog.at_level("INFO", logger="jmoe.convert.loader"):
        cfg, variables = from_hf(path, dtype="float32")
    assert "skipping tensor model.layers.3.eh_proj.weight" in caplog.text
    kernel = variables["params"]["layers_1"]["attn"]["q_a"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), dequantize_fp8_blocks(w8, scale, 8).T)


def test_mxfp4_experts_read_as_the_float_ones():
    """GPT-OSS's MXFP4 expert blocks dequantise and de-interleave to the float checkpoint's
    experts (the fixture's weights are MXFP4-representable)."""
    from jmoe.convert.reader import HFCheckpoint
    from jmoe.convert.rules import InterleavedExperts

    rule = InterleavedExperts((), "model.layers.1.mlp.experts", 4, 32, 32)
    plain = rule.read(HFCheckpoint(FIXTURES / "gpt_oss"))
    packed = rule.read(HFCheckpoint(FIXTURES / "gpt_oss_mxfp4"))
    for a, b in zip(plain, packed, strict=True):
        np.testing.assert_array_equal(a, b)
    fused = HFCheckpoint(FIXTURES / "gpt_oss").get("model.layers.1.mlp.experts.gate_up_proj")
    np.testing.assert_array_equal(plain[0][:, :, 3], fused[:, :, 6])  # gate unit 3: column 6
    np.testing.assert_array_equal(plain[1][:, :, 3], fused[:, :, 7])  # up unit 3: column 7
