"""Write outputs so that a crash leaves either the previous complete output or none."""
import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A process killed outright (SIGKILL, power loss) cannot clean up after itself: its
    # temporaries are removed by the next write of the same output.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _finish_tree(path: Path) -> None:
    """fsync every file, and give the ordinary umask permissions that mkstemp/mkdtemp withheld."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path, is_dir: bool = False):
    """Yield a temporary path next to `path`; on success it is renamed over `path`.

    A directory is replaced by removing the old one and renaming the new one in: between the
    two steps the output is absent, never half-written.
    """
    path = Path(path)
    tmp = _tmp_sibling(path, is_dir)
    try:
        yield tmp
        _finish_tree(tmp)
        if is_dir:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def json_text(data) -> str:
    """Deterministic JSON: sorted keys, fixed indentation."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path, data) -> None:
    """json_text(data), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(data))


def read_json(path, what: str):
    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file {path} is missing", artifact=path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e})", artifact=path) from None


def save_tensors(path, tensors: dict) -> None:
    """Named tensors to a safetensors file, in sorted order (the bytes depend on the values only)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path))


def load_tensors(path, what: str, names=None) -> dict:
    """The named tensors of a safetensors file; a missing, truncated or foreign file is named, and
    so is one whose names are not exactly `names` (when given)."""
    from safetensors.torch import load_file

    from .errors import UserError

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise UserError(f"{what}: {path} is unreadable ({type(e).__name__}: {e})", artifact=path) from None
    if names is not None and set(names) != set(tensors):
        missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
        raise UserError(f"{what}: {path} does not match this model's linears (missing {missing[:3]}, "
                        f"unexpected {extra[:3]})", artifact=path)
    return tensors
