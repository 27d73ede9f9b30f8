"""Recommenders, evaluation metrics and the MLflow registry."""
