"""`python -m usp` is `usp`."""

from usp.cli import main

main()
