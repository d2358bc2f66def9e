"""The method: UCE erasure, Custom Diffusion's merge, MIMA's bi-level immunization with its exact
hypergradient, the parameter sets, the diffusion loss and the one training loop. It works on any diffusers
Stable Diffusion pipeline and knows nothing of the toy world or of experiments."""
