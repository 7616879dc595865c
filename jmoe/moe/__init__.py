"""The MoE layer, stage by stage: routing -> dispatch -> expert compute -> combine."""
