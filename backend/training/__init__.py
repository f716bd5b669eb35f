"""FMbSeg stage 2: features, alignment module, loss, data, training loop."""
