"""Patch-encoded, volume-decoded autoencoder (issue 3)."""
