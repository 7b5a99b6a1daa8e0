"""fedsynth: federated training of diffusion models and synthetic image datasets."""

__version__ = "0.1.0"
