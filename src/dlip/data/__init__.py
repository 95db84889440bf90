"""Data: manifests from what the real tools write, datasets, loaders, synthetic data."""
