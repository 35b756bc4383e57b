"""Mirroring best artifacts to object storage (``artifact.publish``)."""
