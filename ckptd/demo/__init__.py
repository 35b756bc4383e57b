"""``ckptd demo`` and the simulated MMEngine trainer it runs."""
