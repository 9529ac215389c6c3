"""Data layer: layout discovery, annotation parsing, rasterizing, folds, cache, Dataset."""
