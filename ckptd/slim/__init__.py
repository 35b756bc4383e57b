"""Reading and slimming torch checkpoints without running pickled code or importing torch."""
