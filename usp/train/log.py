"""What a training run shows and keeps as it goes: `log.jsonl` rows (the format is `usp.run.log`), TensorBoard
scalars, the progress bar, and the loss curve (`loss.png`) at the end."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from usp.run.log import JsonlLog

log = logging.getLogger("usp")


class RunLog:
    """Writes on the main rank only; other ranks get a silent object with the same methods."""

    def __init__(self, run_dir: Path, is_main: bool, *, start_step: int, total_steps: int, tensorboard: bool,
                 progress: bool):
        self.jsonl, self.is_main, self.writer = JsonlLog(run_dir / "log.jsonl", is_main), is_main, None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and progress), unit="step",
                        dynamic_ncols=True)
        self.rewind(start_step)
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def rewind(self, step: int) -> None:
        """Forget the rows after `step` (see `JsonlLog.rewind`) and what they said was evaluated."""
        self.evaluated_steps = {r["step"] for r in self.jsonl.rewind(step) if "eval" in r}
        self.bar.n = step
        self.bar.refresh()

    def train(self, record: dict) -> None:
        self.jsonl.write(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def evaluation(self, step: int, metrics: dict) -> None:
        """Always written, even when empty: the row marks that the evaluation at `step` (and whatever files
        it wrote) is complete, which is how a restarted run knows not to redo it."""
        self.jsonl.write({"step": step, "eval": metrics})
        self.evaluated_steps.add(step)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
        for key, value in metrics.items() if self.writer is not None else ():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"eval/{key}", value, step)
        if self.is_main and numbers:
            log.info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))

    def close(self) -> None:
        self.bar.close()
        if self.jsonl.file is not None:
            self.jsonl.close()
            from usp.train.curve import write_loss_curve

            write_loss_curve(self.jsonl.path.parent)  # loss.png beside log.jsonl
        if self.writer is not None:
            self.writer.close()
