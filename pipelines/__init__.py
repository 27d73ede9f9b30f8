"""Spark preprocessing (ingest, clean, dedup, impute, split) and Great Expectations gates."""
