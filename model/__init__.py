"""longcap.model: CAFT and its baselines, the training data loader, training and evaluation (torch)."""
