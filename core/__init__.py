"""Shared by every layer: the one user-facing error type and atomic file writes."""
