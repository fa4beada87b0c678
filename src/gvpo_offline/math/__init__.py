"""The pure math: the GVPO loss and its baselines (:mod:`.loss`), held-out metrics and bootstrap
intervals (:mod:`.metrics`). No I/O, and nothing from the rest of the package is imported here."""
