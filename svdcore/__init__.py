"""svdcore: truncated-SVD compression of causal LMs (SVD-LLM family).

Importable with torch and transformers alone; it knows nothing of DVC or MLflow (the stages do),
and datasets is imported where used.
"""
from .errors import UserError

__all__ = ["LowRankLinear", "UserError", "load_compressed", "save_compressed"]
__version__ = "0.1.0"


def __getattr__(name):
    """The compressed-model API, imported on first use: it builds transformers' model classes (about
    2 s), which the stages that read and write only tensors and JSON never need."""
    if name in ("LowRankLinear", "load_compressed", "save_compressed"):
        from . import lowrank

        return getattr(lowrank, name)
    raise AttributeError(f"module 'svdcore' has no attribute {name!r}")
