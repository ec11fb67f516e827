"""fastnorm.train: the thin trainer and its data pieces (sampler, simclr)."""
