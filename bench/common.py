"""What every benchmark prints and records: the device, peak memory, a table, a JSON file."""
import argparse
import json
import platform
import resource
import sys
from pathlib import Path

import torch


OPTIONS = {"shape": "smollm2", "device": "auto", "dtype": "auto"}  # which model shape, on which device, in which dtype


def parser(doc: str, *options: str) -> argparse.ArgumentParser:
    """A benchmark's command line with those of the shared OPTIONS it honours."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in options:
        p.add_argument(f"--{name}", default=OPTIONS[name])
    return p


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    """Wait for the device, so that a timer read after it counts the queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict:
    figures = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        figures["peak_device_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return figures


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of `rows` (dicts), floats to 3 significant figures."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, module: str, argv: list[str] | None, result: dict) -> None:
    """`result` with the command line that made it and the torch version, to `path` if given."""
    argv = sys.argv[1:] if argv is None else argv
    result = {"command": " ".join(["python -m", module, *argv]), "torch": torch.__version__, **result}
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def previous_rows(path: str | None) -> list[dict]:
    """The rows a bench wrote to --json before, so that a rerun adds only what is missing."""
    return json.loads(Path(path).read_text())["rows"] if path and Path(path).is_file() else []
