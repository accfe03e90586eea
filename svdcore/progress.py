"""Progress bars that stay readable in logs (DVC pipes stage output)."""
import sys

from tqdm.auto import tqdm


def progress(*args, **kwargs):
    """tqdm on stderr; when stderr is not a terminal, update at most every 10 seconds."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(*args, **kwargs)
