"""The demo's report: stages and their cost, each metric's protocol, USP vs scratch against a measured noise band,
curves (matplotlib), sample and restoration grids, and the per-step logs (reference curves for `usp compare-run`)."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from usp.demo.verdict import family_verdict, verdict_sentence
from usp.train.engine import read_log

FAMILY = {"dit": "DiT", "sit": "SiT"}


@dataclass(frozen=True)
class ReportData:
    """What the report says about the data it ran on (the embedded default's: Fashion-MNIST)."""

    name: str = "Fashion-MNIST"
    recipes: str = "`configs/fmnist/*.yaml`"
    num_classes: int = 10
    test_images: str = "all 10 000 test images"  # what the probes are scored on
    vae: str | None = None  # the VAE row when no VAE was trained here (None: the small VAE's test PSNR)
    preface: tuple[str, ...] = field(default=())  # lines between the title and the stages (`usp demo --data`: the scan)


def _plot(path: Path, series: dict[str, tuple[list, list]], ylabel: str, title: str,
          errors: dict[str, list] | None = None, logy: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; set here, not at import (no global side effect on import)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=90)
    for label, (xs, ys) in series.items():
        if errors and label in errors:
            ax.errorbar(xs, ys, yerr=errors[label], label=label, marker="o", markersize=3, capsize=2)
        else:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 12 else None, markersize=3)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "nan"
    return str(value)


def _label(key: str) -> str:
    family, init, seed, *init_seed = key.split("_")  # <family>_<init>_s<seed>[_w<init seed>]
    other = f", init seed {init_seed[0][1:]}" if init_seed else ""
    return f"{FAMILY[family]} from {'USP' if init == 'usp' else 'scratch'}, seed {seed[1:]}{other}"


def _probe_gaps(probe: dict) -> dict[str, float]:
    """Top-1 of the USP encoder minus that of random init: the paper's linear probe, then the fast read-out."""
    gaps = {}
    usp, rand = probe.get("usp", {}), probe.get("random_init", {})
    if "top1" in usp.get("paper", {}) and "top1" in rand.get("paper", {}):
        gaps["linear probe"] = usp["paper"]["top1"] - rand["paper"]["top1"]
    if "logistic_top1" in usp.get("fast", {}) and "logistic_top1" in rand.get("fast", {}):
        gaps["logistic regression"] = usp["fast"]["logistic_top1"] - rand["fast"]["logistic_top1"]
    return gaps


def _probe_gap(probe: dict) -> float | None:
    """The headline probe gap: the paper's linear probe when it ran, else the fast read-out."""
    gaps = _probe_gaps(probe)
    return next(iter(gaps.values()), None)


def _steps_to_reach_lines(verdict: dict, usp_seeds: list[int]) -> list[str]:
    """The steps-to-reach table: where the USP arm first matches scratch's final FD and loss, and that step as a
    fraction of scratch's steps (0.5 = USP needs half the steps). FD is evaluated sparsely, so the first evaluated
    step can overstate it by up to one interval: the linearly interpolated crossing is given beside it."""
    total = verdict[usp_seeds[0]]["scratch_steps"]
    lines = [f"Steps to reach scratch's final figure (scratch ran {total} steps; the first evaluated/logged step at "
             "or below it, the FD crossing interpolated linearly between evaluations, and each as a fraction of "
             "scratch's steps):", "",
             "| USP seed | scratch's final FD | USP reaches it at step (interpolated) | fraction | scratch's final "
             "loss | USP reaches it at step | fraction |", "| --- | --- | --- | --- | --- | --- | --- |"]

    def fraction(step) -> str:
        return f"{step / total:.2f}" if step and total else "not reached"

    for s in usp_seeds:
        v = verdict[s]
        crossing = v.get("fd_crossing")
        at = f"{_fmt(v['fd_reached_at'])} ({crossing:.0f})" if crossing else _fmt(v["fd_reached_at"])
        lines.append(f"| {s} | {_fmt(v['scratch_final_fd'])} | {at} | {fraction(v['fd_reached_at'])} "
                     f"({fraction(crossing)}) | {_fmt(v['scratch_final_loss'], 4)} | {_fmt(v['loss_reached_at'])} | "
                     f"{fraction(v['loss_reached_at'])} |")
    return lines


def write_report(out: Path, results: dict, mode: str, seed: int, data: ReportData = ReportData()) -> Path:
    """Write out/report.md, its PNGs, out/results.json and out/logs/<run>/log.jsonl; returns the report path."""
    arms = [k for k, v in results.items() if isinstance(v, dict) and "arm" in v]
    logs = {k: read_log(Path(results[k]["run_dir"])) for k in arms}
    quick = mode.endswith("quick")
    title = {"default": "usp demo", "quick": "usp demo --quick", "full": "usp demo --full (the reproduction)",
             "full-quick": "usp demo --full --quick"}[mode]
    lines = [f"# {title} — {data.name}, one CPU" + (" (plumbing check: the numbers mean nothing)" if quick else ""),
             *data.preface,
             "", f"Seed {seed}. Every stage ran the library's own recipes ({data.recipes}) through the "
             "same engine and commands a user runs on ImageNet. Machine: "
             f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads.", ""]

    # ---- stages -----------------------------------------------------------------------------------------
    lines += ["## Stages and their cost", "", "| stage | wall time (s) | load (1-min, start → end) | result |",
              "| --- | --- | --- | --- |"]
    vae, domain, pre = results["vae"], results["domain"], results["pretrain"]

    def row(name: str, label: str, text: str) -> str:
        load = results[name].get("load")
        load_text = f"{load[0]:.1f} → {load[1]:.1f}" if load else "—"
        return f"| {label} | {results[name]['seconds']} | {load_text} | {text} |"

    lines.append(row("vae", "small VAE (f4, 8 ch)", f"test PSNR {vae['psnr_test']:.2f} dB") if data.vae is None
                 else f"| VAE | 0 | — | {data.vae} |")
    lines.append(row("cache", "latent cache", f"{results['cache']['train']} train + {results['cache']['test']} test "
                                              "images, plain + flipped"))
    lines.append(row("domain", "domain classifier", f"test accuracy {100 * domain['test_accuracy']:.1f}%"))
    lines.append(row("pretrain", "USP pretraining", f"loss {pre['loss_first']:.3f} → {pre['loss_last']:.3f} in "
                                                   f"{pre['steps']} steps, lr {_fmt(pre.get('lr'))} "
                                                   f"({pre.get('schedule', '?')})"))
    for key in arms:
        final = results[key]["final"]
        lines.append(row(key, _label(key), f"domain FD {_fmt(final.get('domain_fd'))} ± "
                                           f"{_fmt(final.get('domain_fd_se'), 2)}, class agreement "
                                           f"{_fmt(final.get('class_agreement'))}"))
    lines.append(row("probe", "probe", "see below"))
    total = sum(r["seconds"] for r in results.values() if isinstance(r, dict) and "seconds" in r)
    lines += [f"| **total** | **{total:.0f}** | | |", ""]

    # ---- generation ---------------------------------------------------------------------------------------
    verdicts: dict[str, dict] = {}
    sentences: list[str] = []
    families = sorted({results[k]["arm"]["family"] for k in arms}, key=list(FAMILY).index)
    if families:
        protocol = results[arms[0]]["protocol"]
        lines += ["## Generation: USP initialisation vs scratch", "",
                  "**Protocol of every generation metric below.** Domain FD: the Fréchet distance between Gaussian "
                  f"fits of a small {data.name} classifier's 128-d features (the `domain` stage) of class-balanced "
                  f"samples and of {protocol['reference']} — **not comparable to Inception FID**; ± is its bootstrap "
                  "sampling error (20 resamples of the generated features). Class agreement: the fraction of "
                  "samples that classifier assigns to the class they were generated for "
                  f"(chance {1 / data.num_classes:.2f}).", "",
                  "| family | model (EMA) | objective | sampler | CFG | samples per evaluation | sample seeds | "
                  "lr, batch |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for family in families:
            p = next(results[k]["protocol"] for k in arms if results[k]["arm"]["family"] == family)
            lines.append(f"| {FAMILY[family]} | {p['model']} | {p['method']} | {p['sampler']} | {p['cfg_scale']} | "
                         f"{p['samples']} | run seed + 10⁷ (the same in both arms of a seed) | "
                         f"{p['lr']:g}, {p['batch']} |")
        lines += ["", "Both arms of a seed share the recipe, data order, diffusion noise and sample seeds: only the "
                  "initial weights differ (paired). The noise band at a step is measured the same way: the distance "
                  "between scratch and a scratch run whose initial weights alone come from another seed (the paired "
                  "band; where that control ran), else the distance between the two scratch seeds (unpaired); never "
                  "below twice the combined bootstrap error. Both bands are shown where both runs exist.", ""]
    for family in families:
        name = FAMILY[family]
        keys = [k for k in arms if k.startswith(family + "_")]
        usp_seeds = sorted(results[k]["arm"]["seed"] for k in keys if results[k]["arm"]["init"] == "usp")
        scratch = [results[k]["arm"] for k in keys if results[k]["arm"]["init"] == "scratch"]
        scratch_seeds = sorted(a["seed"] for a in scratch if a.get("init_seed") is None)
        controls = {a["seed"]: f"{family}_scratch_s{a['seed']}_w{a['init_seed']}" for a in scratch
                    if a.get("init_seed") is not None}
        if len(scratch_seeds) < 2 or not usp_seeds:
            continue
        verdict = family_verdict(logs, family, usp_seeds, (scratch_seeds[0], scratch_seeds[1]), controls)
        verdicts[family] = verdict
        lines += [f"### {name}", "", "| step | " + " | ".join(f"FD {_label(k)}" for k in keys) +
                  " | noise band (paired / unpaired) | " + " | ".join(f"USP gain, seed {s}" for s in usp_seeds) +
                  " |", "| --- " * (2 + len(keys) + len(usp_seeds)) + "|"]
        evals = {k: {e["step"]: e for e in logs[k][1]} for k in keys}
        for step in sorted(set().union(*[set(e) for e in evals.values()])):
            cells = []
            for k in keys:
                e = evals[k].get(step, {})
                cells.append(f"{_fmt(e.get('domain_fd'))} ± {_fmt(e.get('domain_fd_se'), 2)} "
                             f"(agr. {_fmt(e.get('class_agreement'), 2)})" if e else "—")
            band_rows = {s: next((r for r in verdict[s]["fd"] if r["step"] == step), None) for s in usp_seeds}
            some = next((r for r in band_rows.values() if r), None)
            bands = "—" if some is None else (f"±{_fmt(some['band_paired'])} / ±{_fmt(some['band_unpaired'])}"
                                              if "band_paired" in some else f"— / ±{_fmt(some['band_unpaired'])}")
            gains = [f"{r['gain']:+.1f}{' ✓' if r['beyond'] else ''}"
                     f"{'✓' if 'band_paired' in r and r['beyond_unpaired'] else ''}" if r else "—"
                     for r in band_rows.values()]
            lines.append(f"| {step} | " + " | ".join(cells) + f" | {bands} | " + " | ".join(gains) + " |")
        lines += ["", "✓: the USP arm's FD is lower than its paired scratch run's by more than the deciding band "
                  "(the paired one where the init-only control ran, else the unpaired one); ✓✓: by more than both.",
                  ""]
        for s in usp_seeds:
            sentences.append(verdict_sentence(name, s, verdict[s], chance=1 / data.num_classes))
        lines += [f"- {sentences[-len(usp_seeds) + i]}" for i in range(len(usp_seeds))]
        if len(logs[f"{family}_usp_s{usp_seeds[0]}"][1]) > 1:  # with one evaluation there is nothing to reach
            lines += ["", *_steps_to_reach_lines(verdict, usp_seeds)]
        lines.append("")
        loss_series = {_label(k): ([r["step"] for r in logs[k][0]], [r["loss"] for r in logs[k][0]]) for k in keys}
        _plot(out / f"{family}_loss.png", loss_series, "training loss", f"{name} fine-tuning loss")
        fd_series = {_label(k): ([e["step"] for e in logs[k][1]], [e.get("domain_fd", math.nan) for e in logs[k][1]])
                     for k in keys}
        fd_errors = {_label(k): [e.get("domain_fd_se", 0.0) for e in logs[k][1]] for k in keys}
        _plot(out / f"{family}_domain_fd.png", fd_series, "domain FD (lower is better)", f"{name} sample quality",
              errors=fd_errors)
        gain_series = {f"USP vs scratch, seed {s}": ([r["step"] for r in verdict[s]["loss"]["rows"]],
                                                      [100 * r["gain"] for r in verdict[s]["loss"]["rows"]])
                       for s in usp_seeds}
        first = verdict[usp_seeds[0]]["loss"]["rows"]
        paired = verdict[usp_seeds[0]]["loss"].get("paired")
        gain_series["scratch vs its init-only control (chance)" if paired else
                    "scratch seed vs scratch seed (chance)"] = ([r["step"] for r in first],
                                                                [100 * r["chance"] for r in first])
        if paired:
            gain_series["scratch seed vs scratch seed (unpaired chance)"] = (
                [r["step"] for r in first], [100 * r["chance_unpaired"] for r in first])
        _plot(out / f"{family}_loss_gain.png", gain_series, "loss gain over scratch (%)",
              f"{name}: paired training-loss gain")
        lines += [f"![{name} loss]({family}_loss.png) ![{name} domain FD]({family}_domain_fd.png) "
                  f"![{name} paired loss gain]({family}_loss_gain.png)", ""]
        for init in ("usp", "scratch"):
            key = f"{family}_{init}_s{usp_seeds[0]}"
            grids = sorted((Path(results[key]["run_dir"]) / "samples").glob("step_*.png"))
            if grids:
                copy = out / f"{family}_{init}_samples.png"
                copy.write_bytes(grids[-1].read_bytes())
                lines += [f"{_label(key)}, samples at step {int(grids[-1].stem.split('_')[1])} (EMA, CFG "
                          f"{results[key]['protocol']['cfg_scale']}, one column per class):", "",
                          f"![{key}]({copy.name})", ""]

    probe = results["probe"]
    paper = probe["usp"]["paper"]["protocol"]
    fast = probe["usp"]["fast"]["protocol"]
    features = paper["features"]
    lines += ["## Understanding: the paper's linear probe and the fast read-out", "",
              "| features | linear probe top-1 (%) | logistic top-1 (%) | k-NN top-1 (%) | seconds (probe + fast) |",
              "| --- | --- | --- | --- | --- |"]
    for key, label in (("usp", "USP-pretrained encoder"), ("random_init", "same encoder, random init")):
        row = probe[key]
        lines.append(f"| {label} | {row['paper']['top1']:.2f} | {row['fast']['logistic_top1']:.2f} | "
                     f"{row['fast']['knn_top1']:.2f} | {row['paper']['seconds']:.0f} + {row['fast']['seconds']:.0f} |")
    raw = probe["raw_pixels"]["fast"]
    lines += [f"| raw pixels | — | {raw['logistic_top1']:.2f} | — | {raw['seconds']:.0f} |", "",
              f"Features: {features['layer']}, {features['pooling']}, {features['norm']}; "
              f"{paper['train_images']} training images, {data.test_images}.",
              f"Linear probe (paper protocol, Table 12): {paper['classifier']}; {paper['schedule']}; "
              f"augmentation: {paper['augmentation']}.",
              f"Fast read-out (NOT the paper's protocol): {fast['classifier']}; augmentation: {fast['augmentation']}.",
              ""]
    gaps = _probe_gaps(probe)
    if gaps:
        lines += ["USP encoder vs the same encoder at random init: " + ", ".join(
            f"{name} {gap:+.2f} points" for name, gap in gaps.items()) + ".", ""]
    lines += ["## Pretraining", "", "![pretraining loss](pretrain_loss.png)", "",
              "Restoration (rows: original | 75% of latent patches masked | reconstruction):", "",
              "![restoration](restoration.png)", ""]
    pre_history, _ = read_log(Path(results["pretrain"]["weights"]).parent.parent)
    _plot(out / "pretrain_loss.png", {"USP pretraining": ([r["step"] for r in pre_history],
                                                          [r["loss"] for r in pre_history])},
          "masked-latent MSE (norm-pix)", "USP pretraining loss")
    if sentences:
        lines += ["## Verdict", "", *[f"- {s}" for s in sentences], "",
                  "Did USP beat scratch here? Only where a line above says *beyond*; a gap inside the noise band is "
                  "not a win, whichever way it points.", ""]
    # Per-step logs: the reference curves `usp compare-run RUN out/logs/<run>` reads.
    for key in [*arms, "pretrain"]:
        run_dir = Path(results[key]["run_dir"]) if key in arms else Path(results["pretrain"]["weights"]).parents[1]
        target = out / "logs" / key
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "log.jsonl", target / "log.jsonl")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    results = {**results, "verdict": verdicts, "mode": mode, "seed": seed}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return path
