"""A run's record `log.jsonl`: one JSON object per line, its writer and its reader.

Training rows are `{"step", "epoch", "images_seen", "lr", <losses>, "steps_per_s"}`; evaluation rows are
`{"step", "eval": {metrics}}` (written even when empty: the row marks the evaluation at `step` complete). A
resumed run first drops the rows written after the checkpoint it resumes from (the killed run wrote them;
this one writes them again), so no step is ever logged twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from usp.run.checkpoint import atomic_write


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in (path.read_text() if path.is_file() else "").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the resumed run writes it again
            continue
    return rows


def read_log(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """A run's log.jsonl as (training records, evaluations flattened to {"step", **metrics})."""
    rows = read_rows(Path(run_dir) / "log.jsonl")
    return [r for r in rows if "loss" in r], [{"step": r["step"], **r["eval"]} for r in rows if r.get("eval")]


class JsonlLog:
    """Appends rows to `path` on the main rank; other ranks hold no file (but read it, so all ranks agree)."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main, self.file = path, is_main, None

    def rewind(self, step: int) -> list[dict]:
        """Forget the rows after `step` (written by a run that was killed, or rolled back, after them); the kept
        rows are returned."""
        text = self.path.read_text() if self.path.is_file() else ""
        kept = [r for r in read_rows(self.path) if r.get("step", 0) <= step]
        self.close()
        if self.is_main and (len(kept) != len(text.splitlines()) or not text.endswith("\n") and text):
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        self.file = open(self.path, "a") if self.is_main else None
        return kept

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())  # a row on disk before the checkpoint that follows it

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
