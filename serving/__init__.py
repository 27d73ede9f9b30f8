"""Serving tier: bundle publishing, the FastAPI app and its model loading."""
