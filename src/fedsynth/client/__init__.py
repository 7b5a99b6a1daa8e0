"""Client side: local training (``local.py``, no Flower) and the Flower adapter (``app.py``)."""
