"""Overrides that turn any config into a run of seconds: a tiny UNet, two clients, two rounds,
a few steps, a few samples. The test suite's end-to-end runs and the start-up benchmark use
them; so can a user checking a new setup (``--set`` each)."""

TINY = (
    "model.preset=tiny",
    "federation.rounds=2",
    "federation.clients_per_round=2",
    "federation.checkpoint_every=1",
    "partition.num_clients=2",
    "train.local_steps=3",
    "train.batch_size=16",
    "diffusion.num_train_timesteps=50",
    "sample.per_class=3",
    "sample.steps=2",
    "eval.classifier_epochs=1",
    "eval.cas_epochs=1",
)
