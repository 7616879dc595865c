"""Big MoEs in small memory: router statistics, expert pruning and merging, quantized experts.

Each method takes a model (`ModelConfig` and variables, a run of its own or an imported
checkpoint) and returns an ordinary model that trains, saves (`save_compressed`) and serves like
any other (docs/compression.md). Offloaded experts are a serving option
(`jmoe.serve.Engine(..., offload_experts=True)`).
"""

from jmoe.compress.calibration import CALIBRATION_SETS, calibration_tokens
from jmoe.compress.merge import merge_experts
from jmoe.compress.prune import prune_experts
from jmoe.compress.quantize import dequantize_experts, quantize_experts
from jmoe.compress.retrieval import TaskExpertSets
from jmoe.compress.router_stats import RouterStats, router_stats
from jmoe.compress.save import save_compressed
from jmoe.compress.surgery import expert_param_bytes
from jmoe.compress.trace import layer_routings

__all__ = [
    "CALIBRATION_SETS",
    "RouterStats",
    "TaskExpertSets",
    "calibration_tokens",
    "dequantize_experts",
    "expert_param_bytes",
    "layer_routings",
    "merge_experts",
    "prune_experts",
    "quantize_experts",
    "router_stats",
    "save_compressed",
]
