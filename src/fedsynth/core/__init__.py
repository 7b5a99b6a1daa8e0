"""Small shared pieces every layer may use: errors, seed derivation, progress bars, the message
protocol's keys, typed records, update validation and the run directory."""
