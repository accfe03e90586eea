"""Method names are presets of orthogonal knobs; a user may also set the knobs directly.

metric: what the truncation keeps optimal
  plain            ||W - W'||_F                          (SVD; needs no data)
  fisher           ||(W - W') diag(d)||_F, d_j = sqrt(sum_i E[(dL/dW_ij)^2])   (FWSVD)
  activation       ||(W - W') diag(s)||_F, s = mean|x|^α  (ASVD)
  whitening        ||(W - W') X^T||_F via Cholesky of G   (SVD-LLM)
  eigen-whitening  the same loss via the eigendecomposition of G (SVD-LLM V2; no PD needed)
allocation: how the parameter budget is shared between matrices
  uniform          the same ratio everywhere
  v2               per-matrix ratios from the whitened truncation loss (SVD-LLM V2)
  last-k           only the last k decoder layers, each at ratio R L / k (ResSVD)
residual: a first stage keeps `residual_fraction` of each rank under `residual_metric`, the
  residual W - A1 B1 gets the rest under `metric` (ResSVD). 0 turns it off.
update: refit A layer by layer on the inputs of the already compressed prefix (SVD-LLM).
"""
import math
from dataclasses import asdict, dataclass

from .errors import UserError

METRICS = ("plain", "fisher", "activation", "whitening", "eigen-whitening")
ALLOCATIONS = ("uniform", "v2", "last-k")
DATA_METRICS = ("whitening", "eigen-whitening", "activation")  # read the statistics directory
PRESETS = {
    "svd": {"metric": "plain"},
    "fwsvd": {"metric": "fisher"},
    "asvd": {"metric": "activation"},
    "svd-llm": {"metric": "whitening"},
    "svd-llm-v2": {"metric": "eigen-whitening", "allocation": "v2"},
    # measured (bench/ressvd.py): the last-k allocation gains, every residual split tried loses, so
    # the residual stage is off unless asked for; asked for, its first stage is plain SVD
    "ressvd": {"metric": "whitening", "allocation": "last-k", "residual_fraction": 0.0, "residual_metric": "plain"},
}
KNOB_DEFAULTS = {"allocation": "uniform", "residual_fraction": 0.0, "residual_metric": None}


@dataclass(frozen=True)
class Recipe:
    metric: str
    alpha: float = 0.5
    update: bool = False
    allocation: str = "uniform"
    residual_fraction: float = 0.0
    residual_metric: str | None = None
    last_layers: int | None = None  # last-k allocation: None = last_layers_rule

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric a truncation uses (the residual's first stage too)."""
        return (self.metric,) + ((self.residual_metric,) if self.residual_fraction else ())

    @property
    def needs_stats(self) -> bool:
        return any(m in DATA_METRICS for m in self.metrics)

    @property
    def needs_fisher(self) -> bool:
        return "fisher" in self.metrics

    def describe(self) -> dict:
        return asdict(self)


def split_rank(rank: int, fraction: float) -> tuple[int, int]:
    """(first stage, residual stage) ranks of a residual truncation; both >= 1 when rank >= 2."""
    if not fraction or rank < 2:
        return rank, 0
    first = min(max(1, round(rank * fraction)), rank - 1)
    return first, rank - first


def last_layers_rule(layers: int, ratio: float) -> int:
    """ResSVD's partial-layer compression: the last three quarters of the layers, at 4/3 of the
    ratio; more layers when that would pass 0.9 (a layer kept at 10% is already most of the way to
    being dropped). Three quarters beat a half and all layers at 0.2 and 0.4 (bench/ressvd.py)."""
    return min(layers, max(math.ceil(3 * layers / 4), math.ceil(layers * ratio / 0.9)))


def recipe(method: str, metric: str | None = None, alpha: float = 0.5, update: bool = False,
           allocation: str | None = None, residual_fraction: float | None = None,
           residual_metric: str | None = None, last_layers: int | None = None) -> Recipe:
    """The preset of `method`, each knob given (not None) overriding it; incompatible knobs stop."""
    if method not in PRESETS:
        raise UserError(f"compress.method: expected one of {', '.join(PRESETS)}, got {method!r}")
    preset = {**KNOB_DEFAULTS, **PRESETS[method]}
    metric = metric or preset["metric"]
    allocation = allocation or preset["allocation"]
    fraction = preset["residual_fraction"] if residual_fraction is None else residual_fraction
    first = residual_metric or preset["residual_metric"]
    for key, value in (("metric", metric), ("residual_metric", first)):
        if value is not None and value not in METRICS:
            raise UserError(f"compress.{key}: expected one of {', '.join(METRICS)} (or null for the preset), got {value!r}")
    if allocation not in ALLOCATIONS:
        raise UserError(f"compress.allocation: expected one of {', '.join(ALLOCATIONS)} (or null for the preset), "
                        f"got {allocation!r}")
    if not 0 <= fraction < 1:
        raise UserError(f"compress.residual_fraction: expected a share of the rank in [0, 1), got {fraction!r}")
    if fraction and first is None:
        raise UserError("compress.residual_metric: a residual stage (residual_fraction > 0) needs the metric of "
                        f"its first stage, one of {', '.join(METRICS)}")
    if fraction and first == metric:
        raise UserError(f"compress.residual_metric: both stages use {metric}, which is exactly a single "
                        f"truncation at the full rank (Eckart-Young); pick another metric or residual_fraction 0")
    if last_layers is not None and allocation != "last-k":
        raise UserError(f"compress.last_layers: applies to allocation last-k only (allocation is {allocation})")
    return Recipe(metric, alpha, update, allocation, fraction, first if fraction else None, last_layers)


def recipe_from_params(compress: dict) -> Recipe:
    return recipe(compress["method"], compress["metric"], compress["alpha"], compress["update"],
                  compress["allocation"], compress["residual_fraction"], compress["residual_metric"],
                  compress["last_layers"])
