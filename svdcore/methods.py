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
  sensitivity      ranks that minimize the measured end-to-end loss under the budget (LEMS-style)
residual: a first stage keeps `residual_fraction` of each rank under `residual_metric`, the
  residual W - A1 B1 gets the rest under `metric` (ResSVD). 0 turns it off.
update: refit A layer by layer on the inputs of the already compressed prefix (SVD-LLM).
anchor: fit the dense outputs from the shifted inputs (AA-SVD, SAES-SVD): the truncation's
  statistics come from the compressed prefix's inputs X~, and the matrix truncated is the
  least-squares fit of the target ((1 - beta) X~ + beta X) W^T from X~. None: off (the dense
  model's statistics, as SVD-LLM); 0: whitening on the shifted inputs; 1: fully anchored.
anchor_ridge: a ridge toward W in the anchored fit, lambda = anchor_ridge x mean(diag G~): as if n
  more tokens sqrt(lambda) e_j fed both streams, asking W' to keep W's response to every input
  direction. 16k calibration tokens over-fit the plain fit (README); 0: none, the design notes' fit.
refine: steps of AdamW per block on its factors and norms, the compressed block on X~ against the
  dense block on X (AA-SVD's block refinement); 0 turns it off.
"""
import math
from dataclasses import asdict, dataclass

from .errors import UserError

METRICS = ("plain", "fisher", "activation", "whitening", "eigen-whitening")
ALLOCATIONS = ("uniform", "v2", "last-k", "sensitivity")
DATA_METRICS = ("whitening", "eigen-whitening", "activation")  # read the statistics directory
RIDGE = 0.3  # aa-svd's anchor_ridge, chosen on validation text (README); best keeps none (0.01 gained it 0.3%)
PRESETS = {
    "svd": {"metric": "plain"},
    "fwsvd": {"metric": "fisher"},
    "asvd": {"metric": "activation"},
    "svd-llm": {"metric": "whitening"},
    "svd-llm-v2": {"metric": "eigen-whitening", "allocation": "v2"},
    # measured (bench/ressvd.py): the last-k allocation gains, every residual split tried loses, so
    # the residual stage is off unless asked for; asked for, its first stage is plain SVD
    "ressvd": {"metric": "whitening", "allocation": "last-k", "residual_fraction": 0.0, "residual_metric": "plain"},
    # AA-SVD: the fully anchored closed form, then block refinement, uniform ranks; 32 steps where
    # the paper takes about 200, and a ridge toward W (both measured, README "Choosing the
    # error-aware defaults"; anchor_ridge 0 is the closed form of the design notes)
    "aa-svd": {"metric": "whitening", "anchor": 1.0, "anchor_ridge": RIDGE, "refine_steps": 32},
    # the best combination measured (bench/error_aware.py, validation text, README "Choosing the
    # error-aware defaults"): ranks from the end-to-end costs, a light anchor, 32 refinement steps
    "best": {"metric": "whitening", "allocation": "sensitivity", "anchor": 0.25, "refine_steps": 32},
}
KNOB_DEFAULTS = {"allocation": "uniform", "residual_fraction": 0.0, "residual_metric": None, "anchor": None,
                 "anchor_ridge": 0.0, "refine_steps": 0}
REFINE_LR, REFINE_HOLDOUT = 2e-4, 0.0  # defaults of compress.refine.lr / .holdout (0: measured to beat 0.125, README)


@dataclass(frozen=True)
class Recipe:
    metric: str
    alpha: float = 0.5
    update: bool = False
    allocation: str = "uniform"
    residual_fraction: float = 0.0
    residual_metric: str | None = None
    last_layers: int | None = None  # last-k allocation: None = last_layers_rule
    anchor: float | None = None  # None: off; beta in [0, 1]: the closed form on the shifted inputs
    anchor_ridge: float = 0.0  # lambda of the anchored fit / mean(diag G~); 0 with the anchor off
    refine_steps: int = 0  # block refinement: optimizer steps per block, 0 = off
    refine_lr: float = REFINE_LR
    refine_holdout: float = REFINE_HOLDOUT  # share of the calibration windows held out, watched each epoch

    def __post_init__(self):
        # recipe() says so in params.yaml's terms; this catches a Recipe built by hand (the benches)
        if self.anchor is None and self.anchor_ridge:
            raise ValueError(f"anchor_ridge {self.anchor_ridge} without the anchored closed form (anchor None)")

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

    @property
    def needs_windows(self) -> bool:
        """Whether a step depends on the compressed prefix, so the calibration windows must
        stream through the layers while they are compressed."""
        return self.update or self.anchor is not None or self.refine_steps > 0

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
           residual_metric: str | None = None, last_layers: int | None = None, *,
           anchor: float | bool | None = None, anchor_ridge: float | None = None, refine_steps: int | None = None,
           refine_lr: float = REFINE_LR, refine_holdout: float = REFINE_HOLDOUT) -> Recipe:
    """The preset of `method`, each knob given (not None) overriding it; knobs that do not fit
    together stop. `anchor` False turns the preset's anchor off, and its ridge with it. The values
    themselves (a known method, metric and allocation, shares in range) are params.yaml's types' to
    check (svdcore.params), which run these rules too: a recipe from checked params never stops
    here (a method it does not know stops with the line params.yaml's check would give)."""
    if method not in PRESETS:
        raise UserError(f"compress.method: expected one of {', '.join(PRESETS)}, got {method!r}")
    preset = {**KNOB_DEFAULTS, **PRESETS[method]}
    metric = metric or preset["metric"]
    allocation = allocation or preset["allocation"]
    fraction = preset["residual_fraction"] if residual_fraction is None else residual_fraction
    first = residual_metric or preset["residual_metric"]
    if fraction and first is None:
        raise UserError("compress.residual_fraction: a residual stage (residual_fraction > 0) needs the metric of "
                        f"its first stage, compress.residual_metric, one of {', '.join(METRICS)}")
    if fraction and first == metric:
        raise UserError(f"compress.residual_metric: both stages use {metric}, which is exactly a single "
                        f"truncation at the full rank (Eckart-Young); pick another metric or residual_fraction 0")
    if last_layers is not None and allocation != "last-k":
        raise UserError(f"compress.last_layers: applies to allocation last-k only (allocation is {allocation})")
    anchor = preset["anchor"] if anchor is None else (None if anchor is False else float(anchor))
    if anchor is not None and update:
        raise UserError("compress.update: the anchored closed form already fits A and B jointly on the shifted "
                        "inputs, so the update would change nothing; set compress.update false or compress.anchor false")
    if anchor is None and anchor_ridge:
        raise UserError(f"compress.anchor_ridge: {anchor_ridge} damps the anchored closed form, which is off "
                        "(compress.anchor); set compress.anchor or anchor_ridge null")
    ridge = 0.0 if anchor is None else float(preset["anchor_ridge"] if anchor_ridge is None else anchor_ridge)
    steps = preset["refine_steps"] if refine_steps is None else refine_steps
    return Recipe(metric, alpha, update, allocation, fraction, first if fraction else None, last_layers,
                  anchor, ridge, steps, refine_lr, refine_holdout)


def recipe_from_params(compress) -> Recipe:
    """The recipe of params.yaml's compress section (svdcore.params.Compress)."""
    refine = compress.refine
    return recipe(compress.method, compress.metric, compress.alpha, compress.update, compress.allocation,
                  compress.residual_fraction, compress.residual_metric, compress.last_layers,
                  anchor=compress.anchor, anchor_ridge=compress.anchor_ridge, refine_steps=refine.steps,
                  refine_lr=refine.lr, refine_holdout=refine.holdout)
