"""The schema of ``eval_results.json``: written by :mod:`hf_ssl.evaluation`, read by :mod:`hf_ssl.hub` for the model
card's ``model-index``. Both go through this module, so that they agree on what a record is and on when two records
are the same evaluation.

The file is a JSON list of records, one per (evaluation, metric)::

    {"protocol": "knn" | "linear" | "fewshot-finetune-<fraction>%" | "fewshot-scratch-<fraction>%",
     "metric": "top1" | "top5", "value": <percent, 2 decimals>, "dataset": str, "dataset_config": str | None,
     "train_split": str, "test_split": str, "params": {protocol settings}, "seconds": float | None}

Identity: two records are the same evaluation, and the later replaces the earlier, iff they agree on
:data:`IDENTITY_KEYS` (protocol, metric, dataset, dataset_config, train_split, test_split). The label fraction of
a few-shot evaluation is part of its protocol name (:func:`fewshot_protocol`), so 1 % and 10 % are two
evaluations. ``params`` (k, learning rate, seed, ...) and ``seconds`` describe how a result was obtained, not
which result it is: re-running an evaluation with other settings replaces the earlier record.

``seconds`` is null only for entries converted from the first layout (``{"knn_top1": ...}``), which
:func:`read_records` turns into records of this schema.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

FILENAME = "eval_results.json"
RECORD_KEYS = ("protocol", "metric", "value", "dataset", "dataset_config", "train_split", "test_split", "params",
               "seconds")
IDENTITY_KEYS = ("protocol", "metric", "dataset", "dataset_config", "train_split", "test_split")
METRICS = ("top1", "top5")
PROTOCOL_RE = re.compile(r"^(?:knn|linear|fewshot-(?P<init>finetune|scratch)-(?P<fraction>\d+(?:\.\d+)?)%)$")


class EvalRecordError(ValueError):
    """A record that does not follow the eval_results.json schema, or a file that is not a list of records."""


def fraction_name(fraction: float) -> str:
    """0.01 -> "1%", 0.1 -> "10%", 0.025 -> "2.5%"."""
    return f"{round(fraction * 100, 6):g}%"


def fewshot_protocol(kind: str, fraction: float) -> str:
    """The protocol name of a few-shot evaluation: ``fewshot-finetune-1%``, ``fewshot-scratch-10%``."""
    return f"fewshot-{kind}-{fraction_name(fraction)}"


def make_records(protocol: str, scores: dict[str, float], *, dataset: str, dataset_config: str | None,
                 train_split: str, test_split: str, params: dict, seconds: float) -> list[dict]:
    """One record per metric of ``scores`` (``{"top1": %, "top5": %}``)."""
    return [{"protocol": protocol, "metric": metric, "value": round(float(value), 2), "dataset": dataset,
             "dataset_config": dataset_config, "train_split": train_split, "test_split": test_split,
             "params": params, "seconds": round(float(seconds), 2)} for metric, value in scores.items()]


def validate_record(record: dict) -> None:
    """Raise :class:`EvalRecordError` unless ``record`` has exactly this schema."""
    if not isinstance(record, dict) or sorted(record) != sorted(RECORD_KEYS):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise EvalRecordError(f"an eval record needs exactly the keys {list(RECORD_KEYS)}, got {keys}")
    if not PROTOCOL_RE.match(str(record["protocol"])):
        raise EvalRecordError(f"unknown protocol {record['protocol']!r}")
    if record["metric"] not in METRICS:
        raise EvalRecordError(f"metric must be one of {list(METRICS)}, got {record['metric']!r}")
    if not isinstance(record["value"], float) or not 0.0 <= record["value"] <= 100.0:
        raise EvalRecordError(f"value must be a float percentage, got {record['value']!r}")
    for key in ("dataset", "train_split", "test_split"):
        if not isinstance(record[key], str):
            raise EvalRecordError(f"{key} must be a string, got {record[key]!r}")
    if record["dataset_config"] is not None and not isinstance(record["dataset_config"], str):
        raise EvalRecordError(f"dataset_config must be a string or null, got {record['dataset_config']!r}")
    if not isinstance(record["params"], dict):
        raise EvalRecordError(f"params must be a dict, got {record['params']!r}")
    seconds = record["seconds"]
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
        raise EvalRecordError(f"seconds must be a number or null, got {seconds!r}")


def record_key(record: dict) -> tuple:
    """The identity of a record: its values of :data:`IDENTITY_KEYS`."""
    return tuple(record[key] for key in IDENTITY_KEYS)


def merge_records(existing: Iterable[dict], new: Iterable[dict]) -> list[dict]:
    """``existing`` then ``new``, each record replacing any earlier one with the same :func:`record_key` (the
    replacement goes to the end)."""
    merged: dict[tuple, dict] = {}
    for record in (*existing, *new):
        key = record_key(record)
        merged.pop(key, None)
        merged[key] = record
    return list(merged.values())


def _from_first_layout(entry: dict) -> dict:
    """A record of this schema from an entry of the first layout (``{"knn_top1": ..., "knn_k": ...}``)."""
    params = {"k": entry.get("knn_k"), "temperature": entry.get("knn_temperature")}
    return {"protocol": "knn", "metric": "top1", "value": entry["knn_top1"],
            "dataset": entry.get("dataset") or "unknown", "dataset_config": entry.get("dataset_config"),
            "train_split": entry.get("train_split") or "train", "test_split": entry.get("test_split") or "test",
            "params": {k: v for k, v in params.items() if v is not None}, "seconds": entry.get("seconds")}


def read_records(path: str | Path) -> list[dict]:
    """The records of an eval_results.json (``[]`` if there is none), the latest per :func:`record_key`.

    Entries of the first layout are converted; an entry that is not a valid record is skipped with a warning.
    Raises :class:`EvalRecordError` if the file is not JSON or not a list (a single object counts as a list of one).
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise EvalRecordError(f"{path} is not valid JSON: {err}") from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise EvalRecordError(f"{path} does not hold a JSON list")
    records, skipped = [], []
    for entry in raw:
        if isinstance(entry, dict) and "protocol" not in entry and "knn_top1" in entry:
            entry = _from_first_layout(entry)
        if isinstance(entry, dict) and isinstance(entry.get("value"), int) and not isinstance(entry["value"], bool):
            entry = {**entry, "value": float(entry["value"])}
        try:
            validate_record(entry)
        except EvalRecordError as err:
            skipped.append(str(err))
            continue
        records.append(entry)
    if skipped:
        logger.warning("skipping %d entries of %s that are not eval records (%s)", len(skipped), path, skipped[0])
    return merge_records([], records)


def write_records(path: str | Path, records: Sequence[dict]) -> Path:
    """Write ``records`` (validated) to ``path`` atomically."""
    for record in records:
        validate_record(record)
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(list(records), indent=2) + "\n")
    os.replace(tmp, path)
    return path
