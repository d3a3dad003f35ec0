"""The pretraining curve's report from the committed logs alone (no training): docs/curve/README.md's tables,
curve.png, and results.json.

  python scripts/curve_report.py docs/curve

Reads docs/curve/logs/<run>/log.jsonl (training records and {"step", "eval"} records, as the engine writes them),
docs/curve/logs/<probe run>/result.json, docs/curve/logs/stages/*.json (wall time and load of each job).

Steps to reach, per family and seed, for each USP budget and for the init-only scratch control:
- FD: the step where the run's domain FD first reaches scratch's FD at the last fine-tuning step, linearly
  interpolated between evaluations (usp.demo.verdict.crossing_step's reading); before the first evaluation the
  curve is unknown, so a run already there at the first evaluation reads "≤ first step".
- loss: the same on the training loss smoothed over 4 logged intervals (40 steps), target scratch's smoothed loss at
  the last step (the paired runs see the same batches and noise, so the smoothed curves are comparable step by
  step).
- band: the target moved by ± the paired noise band (|scratch − init-only control| at the last step, never below
  2 × the combined bootstrap error for FD) gives the fraction's interval; the control's own fraction is the null.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from usp.demo.verdict import crossing_step as crossing

# The design the logs were made with: logs/design.json (scripts/curve.py writes it). Folders without one are the
# first design (docs/curve/first: 128 fine-tuning steps at batch 64, loss logged every 8 steps).
FIRST_DESIGN = {"ft_steps": 128, "ft_batch": 64, "kept": [80, 160, 320, 640], "pretrain_batch": 256,
                "eval_every": 32, "eval_samples": 500, "ft_log": 8, "seeds": [0, 1], "families": ["sit", "dit"]}
FT_STEPS, FT_IMAGES, FT_LOG = 128, 128 * 64, 8  # set from the design by use_design()
KEPT: tuple[int, ...] = (80, 160, 320, 640)
PRETRAIN_BATCH = 256
SEEDS, FAMILIES = (0, 1), ("sit", "dit")
SMOOTH = 4  # logged intervals the loss is smoothed over


def use_design(logs: Path) -> dict:
    global FT_STEPS, FT_IMAGES, FT_LOG, KEPT, PRETRAIN_BATCH, SEEDS, FAMILIES
    path = logs / "design.json"
    design = json.loads(path.read_text()) if path.exists() else FIRST_DESIGN
    FT_STEPS, FT_IMAGES, FT_LOG = design["ft_steps"], design["ft_steps"] * design["ft_batch"], design["ft_log"]
    KEPT, PRETRAIN_BATCH = tuple(design["kept"]), design["pretrain_batch"]
    SEEDS, FAMILIES = tuple(design["seeds"]), tuple(design["families"])
    return design


def read(run: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    path = run / "log.jsonl"
    if not path.exists():
        return train, evals
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["step"] > FT_STEPS and "curve-pretrain" not in run.name:
            continue
        if "eval" in record:
            evals.append({"step": record["step"], **record["eval"]})
        elif "loss" in record:
            train.append(record)
    # a resumed run logs its steps again after the checkpoint: keep the last record of each step
    dedup = lambda rows: list({r["step"]: r for r in rows}.values())  # noqa: E731
    return sorted(dedup(train), key=lambda r: r["step"]), sorted(dedup(evals), key=lambda r: r["step"])


def smoothed(train: list[dict]) -> list[dict]:
    return [{"step": r["step"], "loss": sum(x["loss"] for x in train[max(0, i - SMOOTH + 1): i + 1])
             / len(train[max(0, i - SMOOTH + 1): i + 1])} for i, r in enumerate(train)]


def fraction_text(value: float | None, first: int) -> str:
    if value is None:
        return "not reached"
    if value <= first:
        return f"≤{first / FT_STEPS:.2f}"
    return f"{value / FT_STEPS:.2f}"


def frac(value: float | None) -> float | None:
    return None if value is None else value / FT_STEPS


def analyse(logs: Path) -> dict:
    out: dict = {}
    for family in FAMILIES:
        for seed in SEEDS:
            runs = {tag: read(logs / f"curve-{family}-{tag}-s{seed}")
                    for tag in ("scratch", "ctrl", *(f"usp{k}" for k in KEPT))}
            scratch_train, scratch_evals = runs["scratch"]
            if not scratch_evals or scratch_evals[-1]["step"] < FT_STEPS:
                continue
            final = scratch_evals[-1]
            ctrl_train, ctrl_evals = runs["ctrl"]
            s_loss = smoothed(scratch_train)
            target_loss = s_loss[-1]["loss"]
            fd_band = loss_band = None
            if ctrl_evals and ctrl_evals[-1]["step"] == FT_STEPS:
                c = ctrl_evals[-1]
                floor = 2 * math.hypot(final["domain_fd_se"], c["domain_fd_se"])
                fd_band = max(abs(final["domain_fd"] - c["domain_fd"]), floor)
                c_loss = smoothed(ctrl_train)
                loss_band = max(abs(a["loss"] - b["loss"]) for a, b in zip(s_loss, c_loss)
                                if a["step"] > FT_STEPS / 2)
            rows = []
            for tag in ("ctrl", *(f"usp{k}" for k in KEPT)):
                train, evals = runs[tag]
                if not evals or evals[-1]["step"] < FT_STEPS:
                    continue
                first = evals[0]["step"]
                s = smoothed(train)
                row = {"init": tag, "pretrain_steps": 0 if tag == "ctrl" else int(tag[3:]),
                       "fd_final": evals[-1]["domain_fd"], "fd_se": evals[-1]["domain_fd_se"],
                       "agreement": evals[-1].get("class_agreement"), "loss_final": s[-1]["loss"],
                       "fd_steps": crossing(evals, final["domain_fd"], "domain_fd"),
                       "loss_steps": crossing(s, target_loss, "loss"), "first_eval": first}
                row["pretrain_images"] = row["pretrain_steps"] * PRETRAIN_BATCH
                row["ratio"] = row["pretrain_images"] / FT_IMAGES
                if fd_band is not None:
                    row["fd_interval"] = [frac(crossing(evals, final["domain_fd"] + fd_band, "domain_fd")),
                                          frac(crossing(evals, final["domain_fd"] - fd_band, "domain_fd"))]
                    row["loss_interval"] = [frac(crossing(s, target_loss + loss_band, "loss")),
                                            frac(crossing(s, target_loss - loss_band, "loss"))]
                rows.append(row)
            out[f"{family}_s{seed}"] = {"scratch_fd": final["domain_fd"], "scratch_fd_se": final["domain_fd_se"],
                                        "scratch_agreement": final.get("class_agreement"),
                                        "scratch_loss": target_loss, "fd_band": fd_band, "loss_band": loss_band,
                                        "rows": rows}
    return out


def probes(logs: Path) -> list[dict]:
    rows = []
    for step in (0, *KEPT):
        name = "probe-random" if step == 0 else f"probe-usp{step}"
        row = {"pretrain_steps": step, "pretrain_images": step * PRETRAIN_BATCH}
        result = logs / name / "result.json"
        if result.exists():
            paper = json.loads(result.read_text())
            row["paper_top1"] = paper.get("top1", paper.get("test_top1"))
        fast = logs / "stages" / f"{name}-fast.log"
        if fast.exists():
            text = fast.read_text()
            start = text.rfind("\n{")
            try:
                result = json.loads(text[start + 1 if start >= 0 else text.find("{"):])
                row["logistic_top1"] = result.get("logistic_top1")
                row["knn_top1"] = result.get("knn_top1")
            except (json.JSONDecodeError, ValueError):
                pass
        rows.append(row)
    return rows


def pretrain_losses(logs: Path) -> list[dict]:
    """The pretraining loss (norm-pix MSE on masked tokens, one logged step) at each kept checkpoint."""
    train, _ = read(logs / "curve-pretrain")
    by_step = {r["step"]: r["loss"] for r in train}
    return [{"pretrain_steps": k, "pretrain_images": k * PRETRAIN_BATCH, "loss": by_step.get(k)} for k in KEPT]


def stage_times(logs: Path) -> list[dict]:
    rows = []
    for path in sorted((logs / "stages").glob("*.json")):
        record = json.loads(path.read_text())
        rows.append({"job": path.stem, "seconds": record["seconds"], "load": record["load"],
                     "finished": record.get("finished")})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, metric in zip(axes, ("fd", "loss")):
        for key, family in result.items():
            rows = [r for r in family["rows"] if r["init"] != "ctrl"]
            xs = [r["pretrain_images"] for r in rows]
            ys = [frac(r[f"{metric}_steps"]) if r[f"{metric}_steps"] is not None else 1.05 for r in rows]
            lo = [max(0.0, y - (r.get(f"{metric}_interval") or [y, y])[0]) if (r.get(f"{metric}_interval") or
                  [None])[0] is not None else 0 for y, r in zip(ys, rows)]
            hi = [((r.get(f"{metric}_interval") or [y, y])[1] or 1.05) - y for y, r in zip(ys, rows)]
            ax.errorbar(xs, ys, yerr=[lo, [max(0.0, h) for h in hi]], marker="o", capsize=3, label=key)
            ctrl = next((r for r in family["rows"] if r["init"] == "ctrl"), None)
            if ctrl and ctrl[f"{metric}_steps"] is not None:
                ax.axhline(frac(ctrl[f"{metric}_steps"]), lw=0.6, ls=":", color=ax.lines[-1].get_color())
        ax.axvline(20 * FT_IMAGES, color="grey", ls="--", lw=0.8)
        ax.text(20 * FT_IMAGES, 0.02, " 20:1 (paper)", color="grey", fontsize=8, transform=ax.get_xaxis_transform())
        ax.axhline(1.0, color="black", lw=0.6)
        ax.axhline(0.5, color="green", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_xlim(KEPT[0] * PRETRAIN_BATCH / 1.5, max(KEPT[-1] * PRETRAIN_BATCH, 20 * FT_IMAGES) * 1.5)
        ax.set_ylim(0.0, 1.1)
        ax.set_xlabel("pretraining images")
        ax.set_title(f"steps to reach scratch's final {'domain FD' if metric == 'fd' else 'loss (smoothed)'}")
    axes[0].set_ylabel(f"fraction of scratch's {FT_STEPS} steps (1.05 = not reached)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_runs(logs: Path, path: Path) -> None:
    """The curves steps-to-reach is read from: domain FD and smoothed loss against fine-tuning step, every arm of
    the first seed (scratch black, init-only control grey, USP budgets from light to dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(FAMILIES), figsize=(5.5 * len(FAMILIES), 7.5), squeeze=False)
    for col, family in enumerate(FAMILIES):
        arms = [("scratch", "black"), ("ctrl", "grey")]
        arms += [(f"usp{k}", plt.cm.viridis(0.85 - 0.8 * i / max(1, len(KEPT) - 1))) for i, k in enumerate(KEPT)]
        for tag, color in arms:
            train, evals = read(logs / f"curve-{family}-{tag}-s{SEEDS[0]}")
            label = tag if not tag.startswith("usp") else f"USP {int(tag[3:]) * PRETRAIN_BATCH:,} images"
            if evals:
                axes[0][col].errorbar([e["step"] for e in evals], [e["domain_fd"] for e in evals],
                                      yerr=[e["domain_fd_se"] for e in evals], color=color, marker=".", label=label)
            if train:
                s = smoothed(train)
                axes[1][col].plot([r["step"] for r in s], [r["loss"] for r in s], color=color, label=label)
        axes[0][col].set_title(f"{family.upper()}, seed {SEEDS[0]}: domain FD (EMA samples)")
        axes[1][col].set_title(f"{family.upper()}, seed {SEEDS[0]}: training loss, smoothed over {SMOOTH} records")
        axes[1][col].set_xlabel("fine-tuning step")
        axes[0][col].set_yscale("log")
        axes[1][col].set_yscale("log")
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(docs: Path) -> None:
    logs = docs / "logs"
    design = use_design(logs)
    result = analyse(logs)
    probe_rows = probes(logs)
    raw = logs / "probe-raw-pixels.json"
    raw_pixels = json.loads(raw.read_text()) if raw.exists() else None
    times = stage_times(logs)
    losses = pretrain_losses(logs)
    summary = {"design": design, "curve": result, "probe": probe_rows, "raw_pixels": raw_pixels,
               "pretrain_loss": losses, "stages": times}
    (docs / "results.json").write_text(json.dumps(summary, indent=1))
    plot(result, docs / "curve.png")
    plot_runs(logs, docs / "runs.png")
    lines = ["| family, seed | init | pretraining images (ratio to fine-tuning) | FD steps fraction [band] | "
             "loss steps fraction [band] | final FD ± SE | agreement | final loss |", "|" + "---|" * 8]
    for key, family in result.items():
        lines.append(f"| {key} | scratch | 0 | 1 (target FD {family['scratch_fd']:.1f}) | 1 (target "
                     f"{family['scratch_loss']:.4f}) | {family['scratch_fd']:.1f} ± {family['scratch_fd_se']:.1f} | "
                     f"{family['scratch_agreement']:.2f} | {family['scratch_loss']:.4f} |")
        for r in family["rows"]:
            band = lambda m, r=r: "" if m not in r else " [" + ", ".join(  # noqa: E731
                "n/r" if v is None else f"{v:.2f}" for v in r[m]) + "]"
            lines.append(f"| {key} | {r['init']} | {r['pretrain_images']:,} ({r['ratio']:.1f}:1) | "
                         f"{fraction_text(r['fd_steps'], r['first_eval'])}{band('fd_interval')} | "
                         f"{fraction_text(r['loss_steps'], FT_LOG)}{band('loss_interval')} | {r['fd_final']:.1f} ± "
                         f"{r['fd_se']:.1f} | {r['agreement']:.2f} | {r['loss_final']:.4f} |")
    (docs / "table.md").write_text("\n".join(lines) + "\n")
    probe_lines = ["| pretraining images | paper linear probe (LARS) top-1 | logistic regression top-1 | k-NN top-1 |",
                   "|---|---|---|---|"]
    for r in probe_rows:
        cell = lambda k, r=r: "" if r.get(k) is None else f"{100 * r[k]:.2f} %" if r[k] <= 1 else f"{r[k]:.2f} %"  # noqa
        probe_lines.append(f"| {r['pretrain_images']:,}{' (random init)' if not r['pretrain_steps'] else ''} | "
                           f"{cell('paper_top1')} | {cell('logistic_top1')} | {cell('knn_top1')} |")
    if raw_pixels:
        top1 = raw_pixels["logistic_top1"]
        probe_lines.append(f"| raw pixels | | {100 * top1 if top1 <= 1 else top1:.2f} % | |")
    probe_lines += ["", "| pretraining steps (images) | pretraining loss at that step |", "|---|---|"]
    for r in losses:
        loss = "not reached" if r["loss"] is None else f"{r['loss']:.4f}"
        probe_lines.append(f"| {r['pretrain_steps']} ({r['pretrain_images']:,}) | {loss} |")
    (docs / "probe.md").write_text("\n".join(probe_lines) + "\n")
    time_lines = ["| job | seconds | 1-min load at start, end | finished |", "|---|---|---|---|"]
    time_lines += [f"| {t['job']} | {t['seconds']} | {t['load'][0]}, {t['load'][1]} | {t['finished']} |"
                   for t in times]
    time_lines.append(f"| total (sum of jobs) | {sum(t['seconds'] for t in times):.0f} | | |")
    (docs / "times.md").write_text("\n".join(time_lines) + "\n")
    print("\n".join(lines + [""] + probe_lines + [""] + time_lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/curve"))
