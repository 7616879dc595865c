"""The shape catalogue shared by tests and benchmarks.

Routing cases produce router logits whose top-k choices hit the situations that break MoE code:
aligned groups, a ragged tail, all tokens on one expert, empty experts, one token per expert,
k = 1, k = E and exact ties. Grouped-matmul cases are group-size vectors over `M` rows, including
empty groups and trailing rows past `sum(group_sizes)` that must cost nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RoutingCase:
    """Router logits `[num_tokens, num_experts]` for one situation, with `k` slots per token."""

    name: str
    num_tokens: int
    num_experts: int
    k: int

    def logits(self, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        t, e = self.num_tokens, self.num_experts
        z = rng.normal(size=(t, e)).astype(np.float32)
        if self.name == "all_to_one_expert":
            z[:, 0] += 20.0
        elif self.name == "empty_experts":
            z[:, 1::2] -= 20.0  # odd experts are never in the top-k (k <= E / 2)
        elif self.name == "one_token_per_expert":
            z = 10.0 * np.eye(t, e, dtype=np.float32) + 0.1 * z
        elif self.name == "ties":
            z = np.zeros((t, e), np.float32)
        return z


ROUTING_CASES = (
    RoutingCase("aligned", 32, 4, 2),
    RoutingCase("ragged_tail", 37, 5, 2),
    RoutingCase("all_to_one_expert", 24, 6, 1),
    RoutingCase("empty_experts", 24, 8, 2),
    RoutingCase("one_token_per_expert", 8, 8, 1),
    RoutingCase("k1", 20, 4, 1),
    RoutingCase("k_equals_e", 12, 4, 4),
    RoutingCase("ties", 9, 4, 2),
)


def group_size_cases(num_rows: int, num_groups: int) -> dict[str, np.ndarray]:
    """Group-size vectors `[num_groups]` int32 over `num_rows` sorted rows (`num_groups >= 3`)."""
    m, g = num_rows, num_groups
    rng = np.random.default_rng(0)
    ragged = rng.multinomial(m - m // 5, np.ones(g) / g)  # trailing unused rows
    ragged[1] = 0
    cases = {
        "aligned": np.full(g, m // g),
        "ragged_tail": ragged,
        "all_in_one_group": np.eye(g, dtype=int)[g // 2] * m,
        "empty_groups": np.array([m // 2 if i in (0, g - 1) else 0 for i in range(g)]),
        "one_row_per_group": np.ones(g, int),
        "all_unused": np.zeros(g, int),
    }
    return {name: sizes.astype(np.int32) for name, sizes in cases.items()}
