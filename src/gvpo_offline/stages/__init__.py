"""The stages a user runs, one module (or package) each: reference (precompute-ref), train, evaluate,
sample, convert, plot. Data flows reference -> train -> evaluate; cli.py calls these."""
