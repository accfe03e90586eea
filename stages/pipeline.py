"""The project's root and its two pipelines, read in one place: the stage names, commands and
outputs that the stages' error hints, the scratch project, the benches and the tests need come from
dvc.yaml and sweep/dvc.yaml here, never from a list kept beside them."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN, SWEEP = ROOT / "dvc.yaml", ROOT / "sweep/dvc.yaml"
PIPELINES = ((MAIN, "dvc repro"), (SWEEP, "dvc repro sweep/dvc.yaml"))  # and the command that runs each


def stages_of(pipeline: Path = MAIN) -> dict:
    """A dvc.yaml's stages (name -> definition), in the order it lists them."""
    import yaml

    return yaml.safe_load(Path(pipeline).read_text())["stages"]


def stage_names(pipeline: Path = MAIN) -> list[str]:
    return list(stages_of(pipeline))


def stage_modules(pipeline: Path = MAIN) -> list[tuple[str, str]]:
    """(stage name, the module under stages/ its command runs) of every stage, in order."""
    return [(name, re.match(r"python -m stages\.(\w+)", stage["cmd"]).group(1))
            for name, stage in stages_of(pipeline).items()]
