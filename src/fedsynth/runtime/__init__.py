"""Where a run executes: Flower's simulation engine in this process (``simulation``), a
private local SuperLink (``superlink``), the ServerApp that a SuperLink runs (``serverapp``),
a ledger node of the decentralized paradigm (``ledger_node``), a real federation's keys
(``deploy``), and the child-process plumbing they share (``processes``: free ports, process
groups, Flower's log filtering)."""
