"""Routers as objects: one frozen dataclass per routing rule, registered by its `kind` (see
`base.Router` for the interface and how to add one)."""

from jmoe.moe.routers.base import (
    ROUTERS,
    Router,
    register_router,
    router_from_dict,
    router_to_dict,
)
from jmoe.moe.routers.budgeted import BudgetedRouter, NullExperts, TopP
from jmoe.moe.routers.expert_choice import ExpertChoice
from jmoe.moe.routers.top_k import TopK

__all__ = [
    "ROUTERS",
    "BudgetedRouter",
    "ExpertChoice",
    "NullExperts",
    "Router",
    "TopK",
    "TopP",
    "register_router",
    "router_from_dict",
    "router_to_dict",
]
