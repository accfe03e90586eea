"""Method names are presets of orthogonal knobs; a user may also set the knobs directly.

metric: what the truncation keeps optimal
  plain            ||W - W'||_F                          (SVD; needs no data)
  activation       ||(W - W') diag(s)||_F, s = mean|x|^α  (ASVD)
  whitening        ||(W - W') X^T||_F via Cholesky of G   (SVD-LLM)
  eigen-whitening  the same loss via the eigendecomposition of G (SVD-LLM V2; no PD needed)
update: refit A layer by layer on the inputs of the already compressed prefix (SVD-LLM).
"""
from dataclasses import dataclass

from .errors import UserError

METRICS = ("plain", "activation", "whitening", "eigen-whitening")
PRESETS = {
    "svd": {"metric": "plain"},
    "asvd": {"metric": "activation"},
    "svd-llm": {"metric": "whitening"},
}


@dataclass(frozen=True)
class Recipe:
    metric: str
    alpha: float = 0.5
    update: bool = False

    @property
    def needs_stats(self) -> bool:
        return self.metric != "plain"

    def describe(self) -> dict:
        return {"metric": self.metric, "alpha": self.alpha, "update": self.update}


def recipe(method: str, metric: str | None = None, alpha: float = 0.5, update: bool = False) -> Recipe:
    """The preset of `method`, with `metric` overriding it when given."""
    if method not in PRESETS:
        raise UserError(f"compress.method: expected one of {', '.join(PRESETS)}, got {method!r}")
    metric = metric or PRESETS[method]["metric"]
    if metric not in METRICS:
        raise UserError(f"compress.metric: expected one of {', '.join(METRICS)} (or null for the preset), got {metric!r}")
    return Recipe(metric, alpha, update)


def recipe_from_params(compress: dict) -> Recipe:
    return recipe(compress["method"], compress["metric"], compress["alpha"], compress["update"])
