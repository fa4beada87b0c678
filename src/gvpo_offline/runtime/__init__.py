"""A run's infrastructure, below every stage: errors, atomic files, progress, signals, workdir
ownership and locks, config files, experiment trackers. Nothing here knows about models or GVPO."""
