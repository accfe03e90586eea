"""params.yaml: read it and check every value before any work starts.

One pydantic model per section (extra keys forbidden, strict types: YAML's `0.2` is a number, its
`"0.2"` or `true` is not), with the ranges and choices in the field types. A bad value stops with
one line naming the key, the value and what is allowed: `_message` turns pydantic's first error
into it, from the field's `expected` text (or, for integers, the bound the error names). The rules
between compress's knobs are svdcore.methods.recipe's, run here too, so that they stop before any
work. `load` gives the stages the typed values (Params); sweep/params.yaml is stages.sweep_params'.
"""
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .choices import (ALLOCATIONS, DEVICE_MAPS, DTYPES, LOADS, METHODS, METRICS, QUANTIZE_SCHEMES, ROUTES, SAMPLERS,  # noqa: F401
                      ZEROSHOT_TASKS)
from .errors import UserError
from .methods import recipe_from_params

OWN = "the method's own"  # what null means for a knob of compress
RULE = "svdcore"  # the error type of rule()
SAID = "svdcore-said"  # the error type of a rule whose message names its own key (Compress's knobs)


def described(expected: str | None = None, null: str | None = None, hint: str | None = None, **constraints):
    """A field's constraints, and what its error line says: "expected <expected>, got <value>"
    (for integers, built from the bound the error names), then "(or null for <null>)" when null
    is allowed, then "(<hint>)"."""
    return Field(json_schema_extra={"expected": expected, "null": null, "hint": hint}, **constraints)


def rule(message: str) -> PydanticCustomError:
    """The error of a rule of our own, said as it is (after the key, when it is a field's)."""
    return PydanticCustomError(RULE, message)


def _choice(options):
    return Annotated[Literal[tuple(options)], described(f"one of {', '.join(options)}")]


Text = Annotated[str, described("a non-empty string", pattern=r"\S")]
Count = Annotated[int, described(ge=1)]  # an integer >= 1
Seed = Annotated[int, described(ge=0)]
Flag = Annotated[bool, described("true or false")]
Ratio = Annotated[float, described("a number in [0, 1) (the fraction of decoder-linear parameters removed)", ge=0, lt=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Model(Section):
    name: Text
    dtype: _choice(DTYPES)
    load: _choice(LOADS)


class Calibration(Section):
    dataset: Text
    sampler: _choice(SAMPLERS)
    samples: Count
    seqlen: Annotated[int, described(ge=8)]
    seed: Seed


class Covariances(Section):
    batch_size: Count
    offload_activations: Flag


class Refine(Section):
    steps: Annotated[int | None, described(null=OWN, ge=0)]
    lr: Annotated[float, described("a learning rate in (0, 1]", hint="YAML reads 2e-4 as text: write 2.0e-4", gt=0, le=1)]
    holdout: Annotated[float, described("a share of the calibration windows in [0, 0.5] (0: none held out, no early "
                                     "stopping)", ge=0, le=0.5)]


class Compress(Section):
    ratio: Ratio
    method: _choice(METHODS)
    metric: Annotated[_choice(METRICS) | None, described(f"one of {', '.join(METRICS)}", null=OWN)]
    alpha: Annotated[float, described("a number in (0, 1] (the exponent of mean |x|)", gt=0, le=1)]
    update: Flag
    allocation: Annotated[_choice(ALLOCATIONS) | None, described(f"one of {', '.join(ALLOCATIONS)}", null=OWN)]
    residual_fraction: Annotated[float | None, described("a number in [0, 1) (the share of each rank given to the "
                                                      "first stage)", null=OWN, ge=0, lt=1)]
    residual_metric: Annotated[_choice(METRICS) | None, described(f"one of {', '.join(METRICS)}", null=OWN)]
    last_layers: Annotated[int | None, described(null="the rule of svdcore.methods.last_layers_rule", ge=1)]
    route: _choice(ROUTES)
    rank_multiple: Count
    anchor: Annotated[Literal[False] | Annotated[float, Field(ge=0, le=1)] | None, described(
        "null (the method's own), false (off: the dense model's statistics) or a blend beta in [0, 1] (0: "
        "whitening on the shifted inputs, 1: fit the dense outputs)")]
    anchor_ridge: Annotated[float | None, described(
        "a number in [0, 1] (the anchored fit's ridge, a share of mean(diag G~))", null=OWN, ge=0, le=1)]
    save_dtype: _choice(DTYPES)
    refine: Refine

    @model_validator(mode="after")
    def _knobs_fit_together(self):
        """The rules between knobs (svdcore.methods.recipe's), checked with the rest: before any work."""
        try:
            recipe_from_params(self)
        except UserError as e:
            raise PydanticCustomError(SAID, str(e)) from None
        return self


class Quantize(Section):
    scheme: _choice(QUANTIZE_SCHEMES)


class Sensitivity(Section):
    samples: Count
    seed: Seed


class Evaluate(Section):
    datasets: Annotated[list[Annotated[str, Field(pattern=r"\S")]], described("a non-empty list of names", min_length=1)]
    seqlen: Annotated[int, described(ge=8)]
    max_windows: Seed
    batch_size: Count
    stream_layers: Flag
    device_map: _choice(DEVICE_MAPS)
    max_memory: Annotated[dict[Annotated[str, Field(pattern=r"^(cpu|cuda:\d+)$")],
                               Annotated[str, Field(pattern=r"^\d+(\.\d+)?[KMG]i?B$")]],
                          described("a mapping of cpu or cuda:N to a size such as 70GiB or 500MB ({}: what is free)")]


class Zeroshot(Section):
    tasks: Annotated[list[str], described(f"a list of task names ({', '.join(ZEROSHOT_TASKS)}), or [] for none")]
    limit: Seed
    batch_size: Count

    @field_validator("tasks")
    @classmethod
    def _known_and_distinct(cls, tasks):
        for task in tasks:
            if task not in ZEROSHOT_TASKS:
                raise rule(f"unknown task {task!r}; expected some of {', '.join(ZEROSHOT_TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise rule(f"each task at most once, got {tasks!r}")
        return tasks


class Generate(Section):
    prompts: Annotated[list[Annotated[str, Field(pattern=r"\S")]],
                       described("a list of non-empty prompt strings (or [] for none)")]
    max_new_tokens: Count


class Distributed(Section):
    nproc_per_node: Count
    nnodes: Count
    rdzv_endpoint: Annotated[str, described("host:port of the rendezvous (localhost:0: a free port, one machine)",
                                         pattern=r"^[^\s:]+:\d+$")]


class Mlflow(Section):
    experiment: Text


class Params(Section):
    device: Annotated[str, described("auto, cpu, cuda or cuda:N", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")]
    model: Model
    calibration: Calibration
    covariances: Covariances
    distributed: Distributed
    compress: Compress
    quantize: Quantize
    sensitivity: Sensitivity
    evaluate: Evaluate
    zeroshot: Zeroshot
    generate: Generate
    mlflow: Mlflow


def _message(error: dict, model: type[BaseModel], prefix: str) -> str:
    """One line for pydantic's `error`: the key, then what is wrong with it."""
    names, info, node = [], None, model
    unknown = error["type"] in ("extra_forbidden", "invalid_key")  # a key that is no field, or not text
    for part in error["loc"]:  # the fields along the path; list indices and union tags are not keys
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            if unknown:
                names.append(str(error["input"] if error["type"] == "invalid_key" else part))
            break
        names.append(part)
        info = node.model_fields[part]
        node = info.annotation
    key = prefix + ".".join(names) if names else prefix.strip() or "params.yaml"
    kind, value = error["type"], error.get("input")
    if kind == "missing":
        return f"{key}: missing from params.yaml"
    if unknown:
        return f"{key}: unknown key; allowed here: {', '.join(node.model_fields)}"
    if kind == "model_type":
        return f"{key}: expected a mapping, got {value!r}"
    if kind == SAID:
        return error["msg"]
    if kind == RULE:  # a field's rule says its key; a model's rule names what it is about itself
        return f"{key}: {error['msg']}" if names else error["msg"]
    if info is None:
        return f"{key}: {error['msg']}"
    said = info.json_schema_extra or {}  # every leaf's, from _field (Annotated metadata merges into it)
    expected = said.get("expected")
    if expected is None:  # an integer: the bound the error names, if any
        bound = error.get("ctx", {}).get("ge")
        expected = "an integer" if bound is None else f"an integer >= {bound}"
    line = f"{key}: expected {expected}, got {value!r}"
    if said.get("null"):
        line += f" (or null for {said['null']})"
    if said.get("hint"):
        line += f" ({said['hint']})"
    return line


def check(model: type[BaseModel], values, prefix: str = ""):
    """`values` as `model` (a Section), or UserError with the first error's line."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        errors = e.errors()
        # a misspelt key reads better as unknown than as the missing one it was meant to be
        first = next((x for x in errors if x["type"] in ("extra_forbidden", "invalid_key")), errors[0])
        raise UserError(_message(first, model, prefix)) from None


def validate(params: dict) -> Params:
    """params.yaml's values, typed; UserError on the first unknown key, missing key or bad value."""
    return check(Params, params)


def load(path="params.yaml", check=validate):
    """Read a parameters file and `check` it: params.yaml's typed values (Params), or what another
    `check` returns for its file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: parameters file is missing")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return check(params)
