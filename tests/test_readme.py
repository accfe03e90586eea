"""The README's commands as a user types them: in a fresh shell whose PATH does not hold the venv,
after the one line that enters it, on a fresh git + DVC repository of the project (tiny model)."""
import json
import re
import sqlite3
import sys
from pathlib import Path

import torch

from conftest import ROOT, copy_repo, logits_in_fresh_process, sh

README = (ROOT / "README.md").read_text()
ACTIVATE = "source .venv/bin/activate"


def block_after(heading: str) -> list[str]:
    """The command lines of the first ```bash block after `heading`, comments stripped."""
    section = README[README.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_environment_is_entered_once_before_any_command_that_needs_it():
    first = min(i for i in (README.find(f"\n{tool} ") for tool in ("dvc", "mlflow", "python -m", "lm_eval")) if i >= 0)
    assert README.index(f"\n{ACTIVATE}\n") < first
    assert ".venv/bin/" not in README.replace(ACTIVATE, "")  # one way in, said once


def test_readme_experiment_commands_work_in_a_fresh_shell(tmp_path, reproduced):
    work, env, _ = copy_repo(reproduced, tmp_path / "repo")  # after the README's first command, `make repro`
    shell = {**{k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
             "PATH": "/usr/local/bin:/usr/bin:/bin",  # a fresh shell's, without the venv that runs this test
             "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh(["git", "add", "-A"], work, shell)
    sh(["git", "commit", "-qm", "project"], work, shell)
    (work / ".venv").symlink_to(Path(sys.executable).parents[1])  # the project's venv, where make puts it
    (work / ".git/info/exclude").write_text(".venv\n")

    def typed(command: str) -> str:
        return sh(["bash", "-c", f"{ACTIVATE} && {command}"], work, shell)

    commands = [c for c in block_after("### Experiments, metrics and history") if not c.startswith("mlflow ui")]
    assert commands[0] == "dvc exp run -S compress.ratio=0.4"
    for command in commands:
        typed(command)
    evaluated = json.loads((work / "metrics/evaluate.json").read_text())
    assert abs(evaluated["ratio"]["linears"] - 0.4) < 0.02

    # the model card, and the MLflow run that finds the model version by its DVC hash
    card = (work / "models/compressed/README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "ratio 0.4" in card
    lock = (work / "dvc.lock").read_text()
    with sqlite3.connect(work / "mlflow.db") as db:
        (md5,) = db.execute("select value from tags where key = 'model_md5'").fetchone()
    assert md5.endswith(".dir") and md5 in lock

    quantize = next(c for c in block_after("### Quantized") if "quantize.scheme" in c)
    output = typed(quantize)
    assert "Running stage 'quantize'" in output and "Running stage 'truncate-and-update'" not in output
    figures = json.loads((work / "metrics/quantize.json").read_text())
    assert figures["scheme"] == "int8" and figures["quantized_linears"] == 28  # 2 layers x 7 linears x 2 factors
    assert figures["bytes_on_disk"] < figures["compressed_bytes_on_disk"]
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    (logits,) = logits_in_fresh_process([work / "models/quantized"], ids, tmp_path)
    assert torch.isfinite(logits).all()
