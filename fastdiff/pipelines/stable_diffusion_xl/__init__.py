"""Stable Diffusion XL pipeline."""
