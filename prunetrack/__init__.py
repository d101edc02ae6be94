"""prunetrack: pruning at initialization, tracked in MLflow."""
__version__ = "0.1.0"

from prunetrack.masking import load_masks, set_masks  # noqa: E402

__all__ = ["__version__", "load_masks", "set_masks"]
