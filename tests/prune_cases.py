"""A tiny MoE LM for the pruning and retrieval tests, and a way to rewrite its MoE leaves."""

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.lm.config import ModelConfig
from jmoe.lm.model import Transformer
from jmoe.moe.config import MoEConfig
from jmoe.moe.routers import TopK

E = 6


def tiny_model(router=TopK(k=2)):
    """A 2-layer, 6-expert LM with router logit biases (vocab 260 fits the byte tokenizer)."""
    moe = MoEConfig(d_model=16, d_ff=8, num_experts=E, router=router, router_bias=True)
    config = ModelConfig(vocab_size=260, d_model=16, n_layers=2, n_heads=2, d_ff=16, moe=moe)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 260, (2, 16)), jnp.int32)
    return config, jax.jit(Transformer(config).init)(jax.random.key(0), tokens), tokens


def set_moe(variables, name, fn):
    """`variables` with `fn(array)` replacing every MoE layer's `moe/<name path>` leaf."""
    collection, *path = name.split("/")

    def replace(tree, keys):
        if not keys:
            return fn(tree)
        return {**tree, keys[0]: replace(tree[keys[0]], keys[1:])}

    tree = variables[collection]
    layers = {
        k: replace(v, ["moe", *path]) if k.startswith("layers_") else v for k, v in tree.items()
    }
    return {**variables, collection: layers}
