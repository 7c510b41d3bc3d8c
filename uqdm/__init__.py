"""Universally Quantized Diffusion Models for progressive image compression."""

__version__ = "0.1.0"
