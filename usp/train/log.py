"""A run's record: `log.jsonl` (one JSON object per line), TensorBoard scalars and the progress bar.

Training rows are `{"step", "epoch", "images_seen", "lr", <losses>, "steps_per_s"}`; evaluation rows are
`{"step", "eval": {metrics}}`. A resumed run first drops the rows written after the checkpoint it resumes
from (the killed run wrote them; this one writes them again), so no step is ever logged twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from usp.train.checkpoint import atomic_write

log = logging.getLogger("usp")


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


class RunLog:
    """Writes on the main rank only; other ranks get a silent object with the same methods."""

    def __init__(self, run_dir: Path, is_main: bool, *, start_step: int, total_steps: int, tensorboard: bool,
                 progress: bool):
        self.path, self.is_main, self.file, self.writer = run_dir / "log.jsonl", is_main, None, None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and progress), unit="step",
                        dynamic_ncols=True)
        self.rewind(start_step)
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def rewind(self, step: int) -> None:
        """Forget the rows after `step` (written by a run that was killed, or rolled back, after them)."""
        text = self.path.read_text() if self.path.is_file() else ""
        kept = [r for r in read_rows(self.path) if r.get("step", 0) <= step]  # every rank reads: all agree
        if self.file is not None:
            self.file.close()
        if self.is_main and (len(kept) != len(text.splitlines()) or not text.endswith("\n") and text):
            text = "".join(json.dumps(r) + "\n" for r in kept)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        self.file = open(self.path, "a") if self.is_main else None
        self.evaluated_steps = {r["step"] for r in kept if "eval" in r}
        self.bar.n = step
        self.bar.refresh()

    def _write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            os.fsync(self.file.fileno())  # a row on disk before the checkpoint that follows it

    def train(self, record: dict) -> None:
        self._write(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def evaluation(self, step: int, metrics: dict) -> None:
        """Always written, even when empty: the row marks that the evaluation at `step` (and whatever files
        it wrote) is complete, which is how a restarted run knows not to redo it."""
        self._write({"step": step, "eval": metrics})
        self.evaluated_steps.add(step)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
        for key, value in metrics.items() if self.writer is not None else ():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"eval/{key}", value, step)
        if self.is_main and numbers:
            log.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None
            from usp.train.curve import write_loss_curve

            write_loss_curve(self.path.parent)  # loss.png beside log.jsonl
        if self.writer is not None:
            self.writer.close()
