"""Reads the run tables (probes.parquet, evals.parquet) and computes metrics, correlations and figures."""
