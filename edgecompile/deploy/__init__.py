"""The ANE-layout rewrite: (B, C, H, W) conv-layout graph, split-einsum attention, BNA as a per-block loop."""
