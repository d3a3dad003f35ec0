"""`usp compare-run RUN REFERENCE`: does a run follow a reference run (or a committed reference curve)?

Both sides are read from their `log.jsonl` (`usp.train.engine.read_log`). At every step both logged, the
training loss, the learning rate and (where evaluated) the domain FD are put side by side, and the first
step where the run leaves the reference's band is reported.

The band at a step: the envelope of the reference runs there (one run, or several seeds when REFERENCE is a
folder holding several runs), widened by a relative tolerance; for FD also by twice the combined bootstrap
error (`domain_fd_se`) when both records carry it. A run "leaves" the band when `patience` consecutive
matching steps fall outside it (one noisy point is not a divergence). A learning rate that differs is
reported on its own: it means the recipes differ, not that training diverged. The first `skip` fraction of the
matching steps is shown but not judged: two seeds start from different random weights, and in that transient
their losses differ by tens of per cent (a 40-step tiny pretraining: 2.37 vs 1.96 at step 4, 0.508 vs 0.515 at
step 24).

Default tolerances come from measurement on this library's Fashion-MNIST SiT recipe (two seeds, same recipe,
logged every 25 steps; see docs/demo/README.md): the per-interval loss of the two seeds differed by at most
a few per cent after the first 100 steps, so 5 % with patience 2 flags no divergence between seeds and flags a
4x smaller lr within a few hundred steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from usp.run.log import read_log

LOSS_TOL = 0.05  # relative; see the module docstring for where it comes from
FD_TOL = 0.10  # relative, on top of 2 x the combined bootstrap error
LR_TOL = 1e-6  # relative: learning rates are computed, not measured
SKIP = 0.2  # fraction of the matching steps (the initial transient) shown but not judged


@dataclass
class Run:
    name: str
    train: list[dict]  # {"step", "loss", "lr", ...} per logged interval
    evals: list[dict]  # {"step", "domain_fd", ...} per evaluation


def load_runs(path: str | Path) -> list[Run]:
    """A run folder (holding log.jsonl), a log.jsonl file, or a folder whose sub-folders hold runs (several
    seeds of one recipe: the reference's band is their envelope)."""
    path = Path(path)
    if path.is_file():
        return [Run(path.parent.name, *read_log(path.parent))] if path.name == "log.jsonl" else _not_a_run(path)
    if (path / "log.jsonl").is_file():
        return [Run(path.name, *read_log(path))]
    logs = sorted(path.glob("*/log.jsonl")) if path.is_dir() else []
    if not logs:
        _not_a_run(path)
    return [Run(log.parent.name, *read_log(log.parent)) for log in logs]


def _not_a_run(path: Path) -> list[Run]:
    raise FileNotFoundError(f"{path}: no log.jsonl there; give a run folder (holding log.jsonl), the log file, "
                            "or a folder of run folders (several seeds of one recipe)")


@dataclass
class Comparison:
    rows: list[dict] = field(default_factory=list)  # one per matching training step
    eval_rows: list[dict] = field(default_factory=list)  # one per matching evaluation step
    loss_leaves_at: int | None = None
    fd_leaves_at: int | None = None
    lr_differs_at: int | None = None

    @property
    def diverged(self) -> bool:
        return self.loss_leaves_at is not None or self.fd_leaves_at is not None


def _by_step(records: list[dict], key: str) -> dict[int, dict]:
    return {r["step"]: r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}


def _first_run_of(flags: list[tuple[int, bool]], patience: int) -> int | None:
    """The step that starts the first `patience` consecutive True flags (steps in order)."""
    streak_start, streak = None, 0
    for step, out in flags:
        streak, streak_start = (streak + 1, streak_start if streak else step) if out else (0, None)
        if streak >= patience:
            return streak_start
    return None


def compare(run: Run, references: list[Run], loss_tol: float = LOSS_TOL, fd_tol: float = FD_TOL,
            patience: int = 2, fd_patience: int = 1, key: str = "loss", skip: float = SKIP) -> Comparison:
    """Side by side at the steps that run and every reference logged; see the module docstring for the band."""
    if not references:
        raise ValueError("compare needs at least one reference run")
    result = Comparison()
    mine, refs = _by_step(run.train, key), [_by_step(r.train, key) for r in references]
    flags = []
    steps = sorted(set(mine).intersection(*refs))
    judged_from = steps[-1] * skip if steps else 0
    for step in steps:
        values = [ref[step][key] for ref in refs]
        low, high = min(values) - loss_tol * abs(min(values)), max(values) + loss_tol * abs(max(values))
        value, lr, ref_lr = mine[step][key], mine[step].get("lr"), refs[0][step].get("lr")
        out = step > judged_from and not low <= value <= high
        lr_differs = lr is not None and ref_lr is not None and abs(lr - ref_lr) > LR_TOL * max(abs(ref_lr), 1e-30)
        if lr_differs and result.lr_differs_at is None:
            result.lr_differs_at = step
        result.rows.append({"step": step, "loss": value, "ref_loss": sum(values) / len(values), "low": low,
                            "high": high, "lr": lr, "ref_lr": ref_lr, "out": out})
        flags.append((step, out))
    result.loss_leaves_at = _first_run_of(flags, patience)

    mine_fd, refs_fd = _by_step(run.evals, "domain_fd"), [_by_step(r.evals, "domain_fd") for r in references]
    fd_flags = []
    fd_steps = sorted(set(mine_fd).intersection(*refs_fd))
    for step in fd_steps:
        records = [ref[step] for ref in refs_fd]
        values = [r["domain_fd"] for r in records]
        errors = [r.get("domain_fd_se", math.nan) for r in [*records, mine_fd[step]]]
        slack = 2 * math.sqrt(max(errors[:-1], default=0.0) ** 2 + errors[-1] ** 2) if all(
            math.isfinite(e) for e in errors) else 0.0
        low = min(values) * (1 - fd_tol) - slack
        high = max(values) * (1 + fd_tol) + slack
        value = mine_fd[step]["domain_fd"]
        out = step > fd_steps[-1] * skip and not low <= value <= high
        result.eval_rows.append({"step": step, "domain_fd": value, "ref_domain_fd": sum(values) / len(values),
                                 "low": low, "high": high, "out": out})
        fd_flags.append((step, out))
    result.fd_leaves_at = _first_run_of(fd_flags, fd_patience)
    return result


def format_comparison(result: Comparison, run_name: str, reference_names: list[str], loss_tol: float,
                      fd_tol: float, patience: int, skip: float = SKIP) -> str:
    """A plain-text table and a verdict (what `usp compare-run` prints)."""
    band = (f"band = reference envelope ({len(reference_names)} run{'s' if len(reference_names) > 1 else ''}) "
            f"± {100 * loss_tol:.0f}% (loss), ± {100 * fd_tol:.0f}% + 2·bootstrap SE (FD); "
            f"leaving = {patience} consecutive logged steps outside; the first {100 * skip:.0f}% of the steps "
            "(the initial transient) are shown, not judged")
    lines = [f"run: {run_name}", f"reference: {', '.join(reference_names)}", band, "",
             f"{'step':>7} {'lr':>10} {'ref lr':>10} {'loss':>9} {'ref loss':>9} {'band':>19} {'Δ%':>7}"]
    for row in result.rows:
        delta = 100 * (row["loss"] - row["ref_loss"]) / row["ref_loss"] if row["ref_loss"] else math.nan
        lr = f"{row['lr']:.3g}" if row["lr"] is not None else "—"
        ref_lr = f"{row['ref_lr']:.3g}" if row["ref_lr"] is not None else "—"
        lines.append(f"{row['step']:>7} {lr:>10} {ref_lr:>10} {row['loss']:>9.4f} {row['ref_loss']:>9.4f} "
                     f"{row['low']:>9.4f}–{row['high']:<9.4f} {delta:>+7.1f}{'  OUT' if row['out'] else ''}")
    if result.eval_rows:
        lines += ["", f"{'step':>7} {'FD':>9} {'ref FD':>9} {'band':>19}"]
        for row in result.eval_rows:
            lines.append(f"{row['step']:>7} {row['domain_fd']:>9.2f} {row['ref_domain_fd']:>9.2f} "
                         f"{row['low']:>9.2f}–{row['high']:<9.2f}{'  OUT' if row['out'] else ''}")
    lines.append("")
    if not result.rows:
        lines.append("no matching logged steps: the two runs log at different steps (train.log_every)")
    if result.lr_differs_at is not None:
        lines.append(f"learning rate differs from step {result.lr_differs_at}: the recipes differ")
    if result.loss_leaves_at is not None:
        lines.append(f"DIVERGED: the loss leaves the reference's band at step {result.loss_leaves_at}")
    if result.fd_leaves_at is not None:
        lines.append(f"DIVERGED: the domain FD leaves the reference's band at step {result.fd_leaves_at}")
    if not result.diverged and result.rows:
        lines.append(f"within the reference's band at all {len(result.rows)} matching steps "
                     f"(last: {result.rows[-1]['step']})")
    return "\n".join(lines)


def compare_runs(run: str | Path, reference: str | Path, loss_tol: float | None = None, fd_tol: float | None = None,
                 patience: int = 2, skip: float | None = None) -> tuple[str, bool]:
    """`usp compare-run RUN REFERENCE`: (the side-by-side table with its verdict, whether RUN left the band).
    A tolerance left None takes this module's default."""
    runs = load_runs(run)
    if len(runs) != 1:
        raise ValueError(f"RUN must be one run (a folder with log.jsonl); {run} holds {len(runs)}")
    references = load_runs(reference)
    loss_tol = LOSS_TOL if loss_tol is None else loss_tol
    fd_tol = FD_TOL if fd_tol is None else fd_tol
    skip = SKIP if skip is None else skip
    result = compare(runs[0], references, loss_tol=loss_tol, fd_tol=fd_tol, patience=patience, skip=skip)
    text = format_comparison(result, runs[0].name, [r.name for r in references], loss_tol, fd_tol, patience, skip)
    return text, result.diverged


def compare_command(run: str, reference: str, loss_tol: float | None = None, fd_tol: float | None = None,
                    patience: int = 2, skip: float | None = None) -> int:
    """`usp compare-run RUN REFERENCE`: prints `compare_runs`' table -> the exit status, 1 when RUN left the band."""
    text, diverged = compare_runs(run, reference, loss_tol=loss_tol, fd_tol=fd_tol, patience=patience, skip=skip)
    print(text)
    return 1 if diverged else 0
