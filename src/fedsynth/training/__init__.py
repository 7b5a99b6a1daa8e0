"""The round skeleton every paradigm drives (``round_loop``: one loop, checkpoints, resume)
and what is trained (``tasks``: the denoiser or the classifier)."""
