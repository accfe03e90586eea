"""svdcore: truncated-SVD compression of causal LMs (SVD-LLM family).

Importable with torch and transformers alone; it knows nothing of DVC or MLflow (the stages do),
and datasets is imported where used.
"""
from .errors import UserError
from .lowrank import LowRankLinear, load_compressed, save_compressed

__all__ = ["LowRankLinear", "UserError", "load_compressed", "save_compressed"]
__version__ = "0.1.0"
