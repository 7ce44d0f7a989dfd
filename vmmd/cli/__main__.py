"""`python -m vmmd.cli`: the vmctl command line."""

from vmmd.cli import main

main()
