"""Row files someone else wrote: an imagefolder's `metadata.jsonl` / `metadata.csv`, and
prompt files in those formats.

The datasets library reports any problem in them as "An error occurred while generating
the dataset", so they are read here first: each problem is one error naming the file and
the line, and a `file_name` that leaves the data folder is refused before anything is read.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from difcompress.core.errors import UserError
from difcompress.core.files import read_text

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every row of a .jsonl or .csv file; one error line naming the
    file, the line and the problem when a row cannot be read."""
    text = read_text(path)
    return _csv_rows(path, text) if path.suffix == ".csv" else _jsonl_rows(path, text)


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON ({err.msg}); one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object; one object per line, e.g. "
                            '{"file_name": "0001.png", "text": "a caption"}')
        rows.append((number, row))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, header = [], None
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = fields
            elif len(fields) > len(header):
                raise UserError(f"{path} line {reader.line_num} has {len(fields)} fields but the header has "
                                f"{len(header)} ({','.join(header)}); quote fields that hold commas")
            else:
                rows.append((reader.line_num, dict(zip(header, fields))))
    except csv.Error as err:
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({err})") from None
    return rows


def check_metadata(root: Path) -> None:
    """Every metadata file of an imagefolder tree holds rows, and each row's `file_name`
    stays inside `root` (no absolute path, no `..`, no symlink pointing out)."""
    inside = root.resolve()
    files = sorted(p for p in root.rglob("metadata.*") if p.name in METADATA_FILES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in files:
        rows = read_rows(path)
        if not rows:
            raise UserError(f"{path} holds no rows; give one row per image with its file_name and caption")
        for number, row in rows:
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise UserError(f"{path} line {number} has no file_name; each row names its image file")
            if Path(name).is_absolute() or ".." in Path(name).parts or \
                    not (path.parent / name).resolve().is_relative_to(inside):
                raise UserError(f"{path} line {number}: file_name {name!r} leads outside the data folder "
                                f"{root}; name files inside it, relative to the metadata file")
