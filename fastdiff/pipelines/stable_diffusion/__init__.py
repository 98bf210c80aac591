"""Stable Diffusion 1.x/2.x pipelines (text-to-image, image-to-image) and the safety checker."""
