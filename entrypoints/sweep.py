"""MLproject entry point `sweep`: the same command as `prunetrack sweep`."""
from prunetrack.cli import main

if __name__ == "__main__":
    main(["sweep", *__import__("sys").argv[1:]])
