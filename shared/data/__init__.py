"""Data: schema, readers, the dataset registry, preprocessing and the split, content features, the catalog bundle, synthetic data."""
