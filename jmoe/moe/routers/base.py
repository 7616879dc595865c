"""Routers as objects: one frozen dataclass per routing rule, registered by its `kind`.

A router owns its fields and their checks, its number of routing slots, its router-state
variables (a selection bias, a compute budget), and `route(logits, state) -> Routing`. The MoE
layer only talks to this interface, so a new router is one new class:

    @register_router
    @dataclasses.dataclass(frozen=True)
    class MyRouter(Router):
        kind: typing.ClassVar[str] = "my_router"
        k: int = 2

        def slots(self, num_experts):
            return self.k

        def route(self, logits_TxE, state, *, step=0, deterministic=True):
            return routing.top_k(logits_TxE, self.k)

In YAML a router is `router: {kind: top_p, p: 0.4}`; on the command line
`model.moe.router=top_p model.moe.router.p=0.4`. The math of each rule is in docs/algorithms.md.
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp

from jmoe.moe import losses, routing

ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: makes `cls` available by `cls.kind` (YAML `router: {kind: ...}`)."""
    if cls.kind in ROUTERS and ROUTERS[cls.kind] is not cls:
        raise ValueError(f"router kind {cls.kind!r} is already registered by {ROUTERS[cls.kind]}")
    ROUTERS[cls.kind] = cls
    return cls


def router_from_dict(fields: dict | str) -> Router:
    """The router a `{kind: ..., field: value}` mapping (or a bare kind name) describes."""
    if isinstance(fields, str):
        fields = {"kind": fields}
    fields = dict(fields)
    kind = fields.pop("kind", None)
    if kind not in ROUTERS:
        raise ValueError(f"router kind {kind!r} is not one of {sorted(ROUTERS)}")
    cls = ROUTERS[kind]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"router {kind!r} has no field {unknown[0]!r}: its fields are {allowed}")
    missing = [name for name in _required_fields(cls) if name not in fields]
    if missing:
        raise ValueError(f"router {kind!r} needs {missing[0]!r} (its fields are {allowed})")
    return cls(**fields)


def _required_fields(cls: type) -> list[str]:
    no_default = dataclasses.MISSING
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is no_default and f.default_factory is no_default
    ]


def router_to_dict(router: Router) -> dict:
    """`{"kind": ..., **fields}`, the inverse of `router_from_dict`."""
    return {"kind": router.kind, **dataclasses.asdict(router)}


@dataclasses.dataclass(frozen=True)
class Router:
    """The interface every router implements (subclasses are frozen dataclasses).

    Class attributes:
      kind: the registered name.
      token_choice: tokens pick experts (True), so a capacity factor may bound each expert's
        rows; False when experts pick tokens.
    """

    kind: typing.ClassVar[str] = ""
    token_choice: typing.ClassVar[bool] = True

    @property
    def owner(self) -> str:
        """The prefix of this router's error messages: its class name."""
        return type(self).__name__

    def check_layer(self, num_experts: int, chain_steps: int) -> None:
        """Raises a ValueError unless the router fits a layer of `num_experts` experts and
        `chain_steps` chained routers. Field-only checks run at construction."""

    def num_outputs(self, num_experts: int) -> int:
        """Router logits per token (true experts plus any null experts)."""
        return num_experts

    def slots(self, num_experts: int) -> int:
        """Routing slots K per token and chain step."""
        raise NotImplementedError

    def expected_active(self, num_experts: int, chain_steps: int) -> float:
        """Expected expert computations per token over all chain steps (FLOP estimates)."""
        return float(self.slots(num_experts) * chain_steps)

    def init_state(self, num_experts: int, chain_steps: int) -> dict[str, jax.Array]:
        """Initial `moe_state` variables of this router (none by default)."""
        return {}

    def update_state(self, state: dict, stats: dict) -> dict:
        """`state` after one training step, from the step's layer statistics (outside autodiff)."""
        return state

    def route(
        self, logits_TxE: jax.Array, state: dict, *, step: int = 0, deterministic: bool = True
    ) -> routing.Routing:
        """The routing of `T` tokens from their router logits (chain step `step`)."""
        raise NotImplementedError

    def gate(
        self,
        x_TxD: jax.Array,
        w_DxE: jax.Array,
        state: dict,
        *,
        step: int = 0,
        deterministic: bool = True,
        implementation: str | None = None,
    ) -> routing.Routing:
        """Router matmul `x @ w` (float32, highest precision), then `route`. Routers with a
        fused kernel override this."""
        logits_TxE = jnp.dot(x_TxD, w_DxE, precision=jax.lax.Precision.HIGHEST)
        return self.route(logits_TxE, state, step=step, deterministic=deterministic)

    def max_rows(self, num_tokens: int, num_experts: int, deterministic: bool) -> int | None:
        """An upper bound on the valid slots of a routing (None: `T * K`)."""
        return None

    def balance_losses(
        self,
        routed: routing.Routing,
        *,
        num_experts: int,
        normalization: str,
        seq_len: int,
        token_mask: jax.Array | None,
    ) -> dict[str, jax.Array]:
        """Unscaled `load_balance_loss` and `seq_balance_loss` of a routing (0 where the router
        has no such loss)."""
        lb = losses.load_balance(
            routed, num_experts=num_experts, normalization=normalization, token_mask=token_mask
        )
        return {"load_balance_loss": lb, "seq_balance_loss": jnp.zeros((), jnp.float32)}

    def loss_coefs(self) -> dict[str, float]:
        """Coefficients of router-owned losses in the layer's `aux_loss`."""
        return {}
