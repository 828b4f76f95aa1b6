"""Shared plumbing for the CT slice-interpolation packages: config schema and atomic writes."""
