"""SIGKILL in the middle of writing an output, recovery by the next `dvc repro`, and
bit-identical artifacts from two independent repositories."""
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from conftest import copy_repo, dvc_repo, set_params, sh

# what must be bit-identical between two runs with the same params and code
ARTIFACTS = ["artifacts/calibration.safetensors", "artifacts/stats", "artifacts/linears.json",
             "artifacts/ranks.json", "models/compressed", "metrics/compress.json"]


def tree_digest(path: Path) -> str | None:
    """One hash over a file or every file of a directory (names and bytes); None if absent."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for file in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
        digest.update(str(file.relative_to(path.parent)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def lock_hashes(work: Path) -> dict:
    """The md5 DVC recorded for every artifact above."""
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    return {path: outs[path] for path in ARTIFACTS}


def kill_when(work: Path, env, dvc, pattern: str) -> None:
    """Start `dvc repro truncate-and-update` and SIGKILL dvc and its stage as soon as a file
    matching `pattern` exists (a temporary output being written)."""
    proc = subprocess.Popen(dvc + ["repro", "truncate-and-update"], cwd=work, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not any(work.glob(pattern)):
            assert proc.poll() is None, f"the run ended before anything matched {pattern}"
            assert time.monotonic() < deadline, f"nothing matched {pattern} in 300 s"
            time.sleep(0.001)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_mid_write_then_repro_recovers_bit_identical(tmp_path, tiny_model_dir, reproduced):
    # B: killed while the statistics are half written (first run: nothing to fall back to)
    work, env, dvc = dvc_repo(tmp_path / "b", tiny_model_dir)
    kill_when(work, env, dvc, "artifacts/.stats.*.tmp/layer_000.safetensors")
    assert not (work / "artifacts/stats").exists(), "a half-written statistics directory was left in place"
    sh(dvc + ["repro", "truncate-and-update"], work, env)
    assert not list(work.glob("artifacts/.*.tmp")), "the temporary of the killed run was not cleaned up"
    before = tree_digest(work / "models/compressed")

    # killed while the compressed model for a new ratio is being written
    set_params(work, compress__ratio=0.4)
    kill_when(work, env, dvc, "models/.compressed.*.tmp/*")
    after_kill = tree_digest(work / "models/compressed")
    assert after_kill in (before, None), "the compressed model was left half-written"
    out = sh(dvc + ["repro", "truncate-and-update"], work, env)
    assert "Running stage 'truncate-and-update'" in out
    assert not list(work.glob("models/.*.tmp"))

    # A: an independent repository (a copy of the suite's reproduced one, run at 0.2), never killed,
    # then set to ratio 0.4
    clean, env_a, _ = copy_repo(reproduced, tmp_path / "a")
    set_params(clean, compress__ratio=0.4)
    sh(dvc + ["repro", "truncate-and-update"], clean, env_a)

    assert lock_hashes(work) == lock_hashes(clean)
    for path in ARTIFACTS:  # DVC's hashes and our own agree that the bytes are the same
        assert tree_digest(work / path) == tree_digest(clean / path), path
