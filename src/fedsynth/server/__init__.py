"""Server side: reply validation, the round loop, and the Flower ServerApp adapter."""
