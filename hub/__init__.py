"""Hugging Face Hub I/O, serving layouts (speculators / vLLM, EAGLE-3) and the export stage."""
