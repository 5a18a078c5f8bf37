"""`python -m weft` runs the CLI."""

from weft.cli import main

main()
