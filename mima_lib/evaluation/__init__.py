"""Evaluation: feature extractors (CLIP, DINO, LPIPS), similarity curves, SGR / MSGR with confidence
intervals, utility checks, tables and pictures. It imports only the method's diffusion helpers."""
