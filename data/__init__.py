"""Dataset YAMLs, hyperparameters and the built-in synthetic dataset generator (data.synthetic)."""
