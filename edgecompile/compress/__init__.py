"""Compression: k-means palettization, sensitivity sweep, bit allocation, self-distillation."""
