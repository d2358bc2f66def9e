"""Test doubles of real models: random-weight pipelines with Stable Diffusion v1-4's shape (sd_shaped)."""
