"""`python -m gvpo_offline ...` == `gvpo-offline ...`."""

from gvpo_offline.cli import main

main()
