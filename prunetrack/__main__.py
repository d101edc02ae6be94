"""`python -m prunetrack prune|sweep|report`: the console script without installing it
(a sweep starts each cell this way, with the interpreter it runs under)."""
from prunetrack.cli import main

main()
