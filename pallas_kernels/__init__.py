"""Pallas TPU (Mosaic) and GPU (Triton) kernels behind `impl="pallas"`; not a user-facing API."""
