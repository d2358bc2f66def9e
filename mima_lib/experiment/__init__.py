"""The experiment layer: a parameter file becomes a validated configuration with one record per concept
(config, concepts), run by the stages notebook after notebook (stages, run) into a run folder of atomic
artifacts with manifests (artifacts); plus the teaching demo and the concept-parallel command."""
