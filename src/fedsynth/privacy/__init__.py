"""Differential privacy: DP-SGD on the diffusion objective (:mod:`.dpsgd`) and (ε, δ)
accounting (:mod:`.accounting`)."""
