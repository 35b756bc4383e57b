"""Values and decisions without side effects: config models, units, best selection, keep-rules."""
