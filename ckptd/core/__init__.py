"""Pure values and decisions: config models, units, best selection, keep-rules. No I/O."""
