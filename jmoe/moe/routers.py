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

from jmoe.kernels import grouped_matmul as kernels
from jmoe.moe import losses, routing
from jmoe.validation import check, check_choice

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

    def check(self, num_experts: int, chain_steps: int) -> None:
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


@register_router
@dataclasses.dataclass(frozen=True)
class TopK(Router):
    """Token-choice top-k (Switch, Mixtral, Qwen, OLMoE, DeepSeek-V2/V3).

    Attributes:
      k: experts per token.
      score: "softmax" or "sigmoid" router scores.
      normalize: renormalise the k weights (only when k > 1 unless `renorm_when_k1`).
      renorm_when_k1: renormalise a single weight too (HF parity; cuts the router gradient).
      scale: routed scaling factor applied to the weights.
      n_groups, top_groups: DeepSeek-V3 group-limited selection (both or neither).
      bias_update_rate: auxiliary-loss-free balancing rate of the selection bias
        (`moe_state/bias`; 0 leaves it fixed).
      seq_balance_coef: DeepSeek-V3 sequence-wise balance loss coefficient.
    """

    kind: typing.ClassVar[str] = "top_k"
    k: int = 2
    score: str = "softmax"
    normalize: bool = True
    renorm_when_k1: bool = False
    scale: float = 1.0
    n_groups: int | None = None
    top_groups: int | None = None
    bias_update_rate: float = 0.0
    seq_balance_coef: float = 0.0

    def __post_init__(self):
        check("k", self.k, self.k >= 1, "an integer >= 1", self.owner)
        check_choice("score", self.score, routing.SCORES, self.owner)
        for name in ("bias_update_rate", "seq_balance_coef"):
            check(name, getattr(self, name), getattr(self, name) >= 0, "a number >= 0", self.owner)

    def check(self, num_experts: int, chain_steps: int) -> None:
        check("k", self.k, self.k <= num_experts, f"at most num_experts={num_experts}", self.owner)
        try:
            routing.check_groups(num_experts, self.k, self.n_groups, self.top_groups)
        except ValueError as e:
            raise ValueError(f"{self.owner}: {e}") from None

    def slots(self, num_experts: int) -> int:
        return self.k

    def init_state(self, num_experts: int, chain_steps: int) -> dict[str, jax.Array]:
        shape = (num_experts,) if chain_steps == 1 else (chain_steps, num_experts)
        return {"bias": jnp.zeros(shape, jnp.float32)}

    def update_state(self, state: dict, stats: dict) -> dict:
        if self.bias_update_rate == 0:
            return state
        bias = losses.update_bias(state["bias"], stats["tokens_per_expert"], self.bias_update_rate)
        return {**state, "bias": bias}

    def _options(self, state: dict, step: int) -> dict:
        bias = state["bias"]
        return dict(
            score=self.score,
            normalize=self.normalize,
            scale=self.scale,
            bias=bias if bias.ndim == 1 else bias[step],
            n_groups=self.n_groups,
            top_groups=self.top_groups,
            renorm_when_k1=self.renorm_when_k1,
        )

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        return routing.top_k(logits_TxE, self.k, **self._options(state, step))

    def gate(self, x_TxD, w_DxE, state, *, step=0, deterministic=True, implementation=None):
        """One fused Pallas kernel for the router matmul and the top-k where `implementation`
        selects it (`jmoe.kernels`), else `route` on `x @ w`."""
        routed, _ = kernels.top_k_gating(
            x_TxD, w_DxE, self.k, **self._options(state, step), implementation=implementation
        )
        return routed

    def balance_losses(self, routed, *, num_experts, normalization, seq_len, token_mask):
        terms = super().balance_losses(
            routed,
            num_experts=num_experts,
            normalization=normalization,
            seq_len=seq_len,
            token_mask=token_mask,
        )
        terms["seq_balance_loss"] = losses.sequence_balance(
            routed, num_experts=num_experts, seq_len=seq_len, token_mask=token_mask
        )
        return terms

    def loss_coefs(self) -> dict[str, float]:
        return {"seq_balance_loss": self.seq_balance_coef}


@dataclasses.dataclass(frozen=True)
class BudgetedRouter(Router):
    """A router with a compute budget: a controller in `moe_state/budget` holds the mean active
    experts per token (over all chain steps) at `target_active_experts`, while each token's count
    still varies. The budget is a pressure toward fewer experts; each subclass says how it
    applies it.

    Attributes:
      target_active_experts: the mean to hold (None: no controller).
      budget_rate: step size of the controller.
    """

    target_active_experts: float | None = dataclasses.field(default=None, kw_only=True)
    budget_rate: float = dataclasses.field(default=0.01, kw_only=True)

    def __post_init__(self):
        check("budget_rate", self.budget_rate, self.budget_rate >= 0, "a number >= 0", self.owner)

    def check(self, num_experts: int, chain_steps: int) -> None:
        if self.target_active_experts is None:
            return
        most = self.slots(num_experts) * chain_steps
        check(
            "target_active_experts",
            self.target_active_experts,
            0 < self.target_active_experts <= most,
            f"None or in (0, {most}] (slots x chain_steps)",
            self.owner,
        )

    def expected_active(self, num_experts: int, chain_steps: int) -> float:
        if self.target_active_experts is None:
            return super().expected_active(num_experts, chain_steps)
        return float(self.target_active_experts)

    def init_state(self, num_experts: int, chain_steps: int) -> dict[str, jax.Array]:
        if self.target_active_experts is None:
            return {}
        return {"budget": jnp.zeros((), jnp.float32)}

    def update_state(self, state: dict, stats: dict) -> dict:
        if self.target_active_experts is None:
            return state
        budget = losses.update_budget(
            state["budget"], stats["active_experts"], self.target_active_experts, self.budget_rate
        )
        return {**state, "budget": budget}

    def pressure(self, state: dict) -> jax.Array | float:
        """The controller's current pressure toward fewer experts (0 without a budget)."""
        return state.get("budget", 0.0)


@register_router
@dataclasses.dataclass(frozen=True)
class NullExperts(BudgetedRouter):
    """AdaMoE: `num_null` null experts beside the true ones; a slot that picks a null expert
    costs nothing, so a token may use fewer true experts. The budget raises the null logits.

    Attributes:
      num_null: null experts M >= 1 (router outputs are `E + M`).
      k: slots per token, counting true and null picks.
      null_balance: load balance of null experts, "grouped" (the paper) or "individual".
    """

    kind: typing.ClassVar[str] = "null_experts"
    num_null: int
    k: int = 2
    null_balance: str = "grouped"

    def __post_init__(self):
        super().__post_init__()
        check("num_null", self.num_null, self.num_null >= 1, "an integer >= 1", self.owner)
        check("k", self.k, self.k >= 1, "an integer >= 1", self.owner)
        check_choice("null_balance", self.null_balance, losses.NULL_BALANCES, self.owner)

    def check(self, num_experts: int, chain_steps: int) -> None:
        total = num_experts + self.num_null
        check("k", self.k, self.k <= total, f"at most num_experts + num_null={total}", self.owner)
        super().check(num_experts, chain_steps)

    def num_outputs(self, num_experts: int) -> int:
        return num_experts + self.num_null

    def slots(self, num_experts: int) -> int:
        return self.k

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        return routing.null_experts(
            logits_TxE, self.k, num_null=self.num_null, null_offset=self.pressure(state)
        )

    def balance_losses(self, routed, *, num_experts, normalization, seq_len, token_mask):
        lb = losses.load_balance(
            routed,
            num_experts=num_experts,
            normalization=normalization,
            num_null=self.num_null,
            null_balance=self.null_balance,
            token_mask=token_mask,
        )
        return {"load_balance_loss": lb, "seq_balance_loss": jnp.zeros((), jnp.float32)}


@register_router
@dataclasses.dataclass(frozen=True)
class TopP(BudgetedRouter):
    """Dynamic top-p ("Harder Tasks Need More Experts"): each token takes experts in descending
    probability until their cumulative probability passes `p`. The budget lowers `p`.

    Attributes:
      p: threshold in (0, 1].
      max_k: optional cap on experts per token (default: all experts).
      boundary: "strict" (cumulative > p, the paper's code) or "inclusive" (>= p).
    """

    kind: typing.ClassVar[str] = "top_p"
    p: float = 0.4
    max_k: int | None = None
    boundary: str = "strict"

    def __post_init__(self):
        super().__post_init__()
        check("p", self.p, 0 < self.p <= 1, "in (0, 1]", self.owner)
        check(
            "max_k", self.max_k, self.max_k is None or self.max_k >= 1, "None or >= 1", self.owner
        )
        check_choice("boundary", self.boundary, routing.TOP_P_BOUNDARIES, self.owner)

    def check(self, num_experts: int, chain_steps: int) -> None:
        check(
            "max_k",
            self.max_k,
            self.max_k is None or self.max_k <= num_experts,
            f"None or in [1, num_experts={num_experts}]",
            self.owner,
        )
        super().check(num_experts, chain_steps)

    def slots(self, num_experts: int) -> int:
        return self.max_k or num_experts

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        p = self.p
        if "budget" in state:
            p = jnp.clip(self.p - self.pressure(state), 1e-6, 1.0)
        return routing.top_p(logits_TxE, p, max_k=self.max_k, boundary=self.boundary)


@register_router
@dataclasses.dataclass(frozen=True)
class ExpertChoice(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` best tokens, so loads
    are balanced by construction (no load-balance loss). Not causal: a token's experts depend on
    the later tokens of the batch, so a causal LM would see the future; `allow_noncausal=True`
    acknowledges that.

    Attributes:
      capacity_factor: experts per token on average; an expert takes
        `round(capacity_factor * T / E)` tokens, in [1, T].
      eval_capacity_factor: the factor when `deterministic=True` (default: the same).
      allow_noncausal: must be True.
    """

    kind: typing.ClassVar[str] = "expert_choice"
    token_choice: typing.ClassVar[bool] = False
    capacity_factor: float = 2.0
    eval_capacity_factor: float | None = None
    allow_noncausal: bool = False

    def __post_init__(self):
        check(
            "allow_noncausal",
            self.allow_noncausal,
            self.allow_noncausal,
            "True to use expert choice, which is not causal: a token's experts depend on later "
            "tokens, so a causal LM would see the future",
            self.owner,
        )
        cf, eval_cf = self.capacity_factor, self.eval_capacity_factor
        check("capacity_factor", cf, cf > 0, "a number > 0", self.owner)
        check(
            "eval_capacity_factor",
            eval_cf,
            eval_cf is None or eval_cf > 0,
            "None or > 0",
            self.owner,
        )

    def capacity(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        """Tokens each expert takes: `round(cf * T / E)` in [1, T]."""
        factor = self.capacity_factor
        if deterministic and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        return min(max(round(factor * num_tokens / num_experts), 1), num_tokens)

    def slots(self, num_experts: int) -> int:
        return num_experts

    def expected_active(self, num_experts: int, chain_steps: int) -> float:
        return float(self.capacity_factor * chain_steps)

    def route(self, logits_TxE, state, *, step=0, deterministic=True):
        t, e = logits_TxE.shape
        return routing.expert_choice(logits_TxE, self.capacity(t, e, deterministic))

    def max_rows(self, num_tokens: int, num_experts: int, deterministic: bool) -> int:
        return num_experts * self.capacity(num_tokens, num_experts, deterministic)

    def balance_losses(self, routed, *, num_experts, normalization, seq_len, token_mask):
        zero = jnp.zeros((), jnp.float32)
        return {"load_balance_loss": zero, "seq_balance_loss": zero}
