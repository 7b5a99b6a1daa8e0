"""Decentralized paradigm, chain side: round contract, content store, nodes, federation set-up."""
