"""Evaluators of product features: retrieval, classification, clustering."""
