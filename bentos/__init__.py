"""BentoML services. Self-contained: nothing here imports from ``flows`` or ``tasks``."""
