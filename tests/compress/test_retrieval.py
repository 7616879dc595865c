"""`jmoe.compress.retrieval`: tasks whose routing is known by construction get the expert sets
and patterns predicted for them, and a query retrieves the task it resembles."""

import jax.numpy as jnp
import numpy as np
import pytest
from prune_cases import E, set_moe, tiny_model

from jmoe.compress import surgery
from jmoe.compress.retrieval import TaskExpertSets
from jmoe.compress.router_stats import router_stats
from jmoe.train.tokenizer import ByteTokenizer

LOWER, UPPER = "abcdefghijklmnopqrstuvwxyz" * 2, "ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2


@pytest.fixture(scope="module")
def model():
    """Every layer's router sees its token's embedding: attention and experts add nothing to
    the residual stream. Lowercase letters point along axis 0, every other token along axis 1;
    experts 0, 1 listen to axis 0 and experts 2, 3 to axis 1 (4, 5 to neither)."""
    config, variables, _ = tiny_model()
    lower_V = np.zeros(config.vocab_size, bool)
    lower_V[97:123] = True
    embed = np.where(lower_V[:, None], np.eye(16)[0], np.eye(16)[1]) * 3.0
    params = {**variables["params"], "embed": {"embedding": jnp.asarray(embed, jnp.float32)}}
    for name in params:
        if name.startswith("layers_"):
            params[name] = {**params[name], "attn": {**params[name]["attn"]}}
            params[name]["attn"]["o"] = {
                "kernel": jnp.zeros_like(params[name]["attn"]["o"]["kernel"])
            }
    variables = {**variables, "params": params}
    variables = set_moe(variables, "params/experts/w_down", jnp.zeros_like)
    kernel = np.zeros((16, E))
    kernel[0, :2] = [5.0, 4.8]
    kernel[1, 2:4] = [5.0, 4.8]
    variables = set_moe(
        variables, "params/router/kernel", lambda _: jnp.asarray(kernel, jnp.float32)
    )
    variables = set_moe(variables, "params/router/bias", jnp.zeros_like)
    return config, variables


def test_each_task_keeps_the_experts_its_tokens_route_to(model, tmp_path):
    config, variables = model
    tasks = {"lower": [LOWER], "upper": [UPPER]}
    sets = TaskExpertSets.build(config, variables, ByteTokenizer(), tasks, keep=2, seq_len=16)
    assert sets.tasks == ("lower", "upper") and sets.layers == (0, 1)
    np.testing.assert_array_equal(sets.expert_ids[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(sets.expert_ids[1], [[2, 3], [2, 3]])
    # The predicted pattern: each lowercase token splits softmax([5, 4.8] * 4) over experts 0, 1
    # (RMSNorm scales the embedding to norm 4); the one end-of-text token goes to 2, 3.
    q = np.exp(4 * np.array([5.0, 4.8]))
    q /= q.sum()
    want = np.zeros(E)
    want[:2], want[2:4] = 52 / 53 * q, 1 / 53 * q
    np.testing.assert_allclose(sets.patterns[0], [want, want], rtol=1e-4)
    path = sets.save(tmp_path / "task_experts.json")
    loaded = TaskExpertSets.load(path)
    assert loaded.tasks == sets.tasks and loaded.keep == 2
    np.testing.assert_array_equal(loaded.expert_ids, sets.expert_ids)
    np.testing.assert_allclose(loaded.patterns, sets.patterns)


def test_a_query_retrieves_the_task_it_resembles_by_cosine_similarity(model):
    config, variables = model
    sets = TaskExpertSets.build(
        config, variables, ByteTokenizer(), {"lower": [LOWER], "upper": [UPPER]}, keep=2, seq_len=16
    )
    mostly_upper = jnp.asarray([list(b"HELLO WORLD, hi")], jnp.int32)
    task, similarity = sets.nearest(config, variables, mostly_upper)
    assert task == "upper" and similarity[1] > similarity[0]
    pattern = router_stats(config, variables, mostly_upper, confidence=sets.confidence).tcess
    cosine = [
        (p * pattern).sum() / np.linalg.norm(p) / np.linalg.norm(pattern) for p in sets.patterns
    ]
    np.testing.assert_allclose(similarity, cosine, rtol=1e-6)
    lower = jnp.asarray([list(b"retrieval")], jnp.int32)
    task, new_config, new_variables = sets.pruned_for_query(config, variables, lower)
    assert task == "lower" and new_config.moe.num_experts == 2
    kernel = surgery.moe_layer_weights(new_config, new_variables)[0].params["router"]["kernel"]
    np.testing.assert_array_equal(kernel[:2], np.float32([[5.0, 4.8], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="unknown task"):
        sets.pruned(config, variables, "json")
