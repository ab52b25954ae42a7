"""Deployment profiles: the same assets with other executors and instance configs (see README)."""
