"""The loss curve of a run, as a PNG beside its log (`<run>/loss.png`), written when training ends."""

from __future__ import annotations

import json
from pathlib import Path


def write_loss_curve(run_dir: str | Path) -> Path | None:
    """Plot every logged training loss of `<run_dir>/log.jsonl` against images seen; None when nothing is logged."""
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; set here, not at import (no global side effect on import)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=90)
    # Images seen, not steps: curves of runs with different batch sizes line up (STYLE.md, habit 4).
    ax.plot([r.get("images_seen", r["step"]) for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 12
            else None, markersize=3)
    ax.set_xlabel("images seen")
    ax.set_ylabel("training loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path
