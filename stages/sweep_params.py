"""sweep/params.yaml: its typed values, and the compress params of one sweep point. The sweep's own
rules live here, beside the stages that run it; svdcore.params knows params.yaml alone."""
from typing import Annotated

from pydantic import Field, model_validator

from svdcore.errors import UserError
from svdcore.methods import PRESETS, recipe
from svdcore.params import Compress, Section, Text, check, described, rule


def preset_of(method: str) -> tuple[str, bool]:
    """(preset, closed-form update on) of a sweep method: a preset, or a preset and "+update"
    ("svd-llm+update"); UserError for anything else, or a preset the update does not fit."""
    name, plus, extra = method.partition("+")
    if plus and extra != "update":
        raise UserError(f"sweep methods: {method!r}: expected a preset, optionally followed by +update")
    if name not in PRESETS:
        raise UserError(f"sweep methods: expected one of {', '.join(PRESETS)}, got {name!r}")
    try:
        recipe(name, update=bool(plus))
    except UserError as e:
        raise UserError(f"sweep methods: {method!r}: {e}") from None
    return name, bool(plus)


def sweep_compress(compress: Compress, method: str, ratio: float) -> Compress:
    """The compress params of one sweep point: the knobs are the preset's (a sweep compares presets),
    the rest (route, rank_multiple, alpha, save_dtype, the refinement's lr and holdout) the main
    params'."""
    name, update = preset_of(method)
    return compress.model_copy(update={
        "method": name, "ratio": ratio, "metric": None, "allocation": None, "update": update,
        "residual_fraction": None, "residual_metric": None, "last_layers": None, "anchor": None,
        "anchor_ridge": None,
        "refine": compress.refine.model_copy(update={"steps": None})})


class Sweep(Section):
    """sweep/params.yaml: methods (preset_of), ratios in (0, 1), the methods also scored zero-shot
    (some of the methods), the MLflow experiment."""
    methods: Annotated[list[Annotated[str, Field(pattern=r"\S")]], described("a non-empty list of names", min_length=1)]
    ratios: Annotated[list[Annotated[float, Field(gt=0, lt=1)]], described(
        "a non-empty list of ratios in (0, 1) (0 is the dense model, already in the report)", min_length=1)]
    zeroshot_methods: Annotated[list[Annotated[str, Field(pattern=r"\S")]], described("a list of names")]
    experiment: Text

    @model_validator(mode="after")
    def _consistent(self):
        for method in self.methods:
            try:
                preset_of(method)
            except UserError as e:
                raise rule(str(e)) from None
        stray = [m for m in self.zeroshot_methods if m not in self.methods]
        if stray:
            raise rule(f"sweep: zeroshot_methods must be some of methods {self.methods}, got {stray}")
        if len(set(self.methods)) < len(self.methods) or len(set(self.ratios)) < len(self.ratios):
            raise rule(f"sweep: methods and ratios must not repeat, got {self.methods} x {self.ratios}")
        return self


def validate_sweep(sweep: dict) -> Sweep:
    return check(Sweep, sweep, "sweep ")
