"""The four paradigms, each a way to train one run: ``centralized`` (one trainer, the
baseline), ``federated`` (Flower: a server and clients, :mod:`fedsynth.server` /
:mod:`fedsynth.client`), ``decentralized`` (a round contract and a content store,
:mod:`fedsynth.ledger`) and ``local_models`` (paradigm ``local``: each client trains alone, the
synthetic set is drawn from the mixture of their models)."""
