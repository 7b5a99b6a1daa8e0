"""Pictures and the markdown report."""
