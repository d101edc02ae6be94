"""MLproject entry point `prune`: the same command as `prunetrack prune`."""
from prunetrack.cli import main

if __name__ == "__main__":
    main(["prune", *__import__("sys").argv[1:]])
