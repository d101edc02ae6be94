"""prunetrack: pruning at initialization, tracked in MLflow."""
__version__ = "0.1.0"

__all__ = ["__version__", "load_masks", "set_masks"]


def __getattr__(name: str):
    # Imported on first use: masking imports torch, and `prunetrack --help` (which
    # imports this package) should not wait for it.
    if name in ("load_masks", "set_masks"):
        from prunetrack import masking

        return getattr(masking, name)
    raise AttributeError(f"module 'prunetrack' has no attribute {name!r}")
