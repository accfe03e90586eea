"""The seven zero-shot evaluation splits shipped in data/zeroshot/, read offline.

Each reader returns the records in the field layout of the Hugging Face dataset that lm-eval's
own task definition reads, so that our task YAMLs (svdcore/zeroshot_tasks/) keep lm-eval's
prompts, targets and choices unchanged and differ only in where the data comes from.
The shipped files are gzipped, otherwise as collected (see data/zeroshot/SOURCE.md).
"""
import gzip
import json
from functools import partial
from pathlib import Path

from .data import data_dir
from .errors import UserError

# The split each lm-eval task scores (its test split where it has one, else validation).
SPLITS = {"piqa": "validation", "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation",
          "winogrande": "validation", "openbookqa": "test", "mathqa": "test"}


def zeroshot_dir() -> Path:
    return data_dir() / "zeroshot"


def _open(path: Path):
    if not path.is_file():
        raise UserError(f"zeroshot: data file {path} is missing (it ships in the repository's data/zeroshot/)")
    return gzip.open(path, "rt", encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    with _open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_lines(path: Path) -> list[str]:
    with _open(path) as fh:
        return [line.strip() for line in fh if line.strip()]


def piqa_records(folder: Path) -> list[dict]:
    """The authors' files keep the labels apart; HF's piqa has them as an int `label`."""
    records = read_jsonl(folder / "piqa/valid.jsonl.gz")
    labels = read_lines(folder / "piqa/valid-labels.lst.gz")
    if len(labels) != len(records):
        raise UserError(f"zeroshot: piqa has {len(records)} items but {len(labels)} labels")
    return [{**record, "label": int(label)} for record, label in zip(records, labels)]


def arc_records(path: Path) -> list[dict]:
    """Our ARC copy holds the choice texts and the gold index, not AI2's choice labels; rebuild
    HF's `choices: {text, label}` and `answerKey` with letters, which index the same choice."""
    records = []
    for record in read_jsonl(path):
        letters = [chr(ord("A") + i) for i in range(len(record["choices"]))]
        records.append({"id": record["id"], "question": record["question"],
                        "choices": {"text": record["choices"], "label": letters},
                        "answerKey": letters[record["gold"]]})
    return records


def mathqa_records(path: Path) -> list[dict]:
    with _open(path) as fh:
        return json.load(fh)


READERS = {
    "piqa": piqa_records,
    "arc_easy": lambda folder: arc_records(folder / "arc_easy/ARC-Easy-test.jsonl.gz"),
    "arc_challenge": lambda folder: arc_records(folder / "arc_challenge/ARC-Challenge-test.jsonl.gz"),
    "hellaswag": lambda folder: read_jsonl(folder / "hellaswag/hellaswag_val.jsonl.gz"),
    "winogrande": lambda folder: read_jsonl(folder / "winogrande/dev.jsonl.gz"),
    "openbookqa": lambda folder: read_jsonl(folder / "openbookqa/test.jsonl.gz"),
    "mathqa": lambda folder: mathqa_records(folder / "mathqa/test.json.gz"),
}


def task_records(task: str, folder=None) -> list[dict]:
    """The records of one task's evaluation split, in HF layout."""
    return READERS[task](Path(folder) if folder else zeroshot_dir())


def _dataset(task: str, data_dir=None, **_):
    """lm-eval's `custom_dataset` hook: called with the task's metadata (where TaskManager puts
    our `data_dir`); returns a DatasetDict holding just the split the task scores."""
    import datasets

    return datasets.DatasetDict({SPLITS[task]: datasets.Dataset.from_list(task_records(task, data_dir))})


# One hook per task, named as the task, for `custom_dataset: !function` in the YAMLs.
piqa = partial(_dataset, "piqa")
arc_easy = partial(_dataset, "arc_easy")
arc_challenge = partial(_dataset, "arc_challenge")
hellaswag = partial(_dataset, "hellaswag")
winogrande = partial(_dataset, "winogrande")
openbookqa = partial(_dataset, "openbookqa")
mathqa = partial(_dataset, "mathqa")
