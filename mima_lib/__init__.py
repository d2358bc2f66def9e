"""mima: multi-concept model immunization of text-to-image diffusion models (MIMA, AAAI 2025)."""

__version__ = "0.1.0"
