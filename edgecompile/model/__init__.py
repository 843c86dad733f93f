"""The reference, training-layout elastic DiT: config, model, elastic slicing, checkpoints, sampling."""
