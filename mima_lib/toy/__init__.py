"""The toy world: a renderer of objects and artists' styles (world, shapes), the tiny Stable-Diffusion-shaped
model trained on it (model: `load_toy_pipeline`, build), its oracle, the stand-in for CLIP/DINO (oracle:
`load_toy_oracle`, `OracleExtractor`, `oracle_scorer`), its quality bar and the data it gives the method and the
attacks. Nothing below it imports it: the experiment layer chooses it for `model: toy`."""
