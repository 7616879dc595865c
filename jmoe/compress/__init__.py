"""Big MoEs in small memory: router statistics, expert pruning and merging, quantized experts."""
