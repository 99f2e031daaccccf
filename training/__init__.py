"""Everything that changes weights: model families, tuning recipes, the embedded world, the sequential loop."""
