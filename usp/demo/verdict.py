"""USP vs scratch with a measured noise band: the numbers behind the demo's verdict (no files, no plots).

Three measurements, each against its own noise:
- domain FD at each evaluation, USP arm vs the scratch arm of the same seed (same data order, diffusion noise and
  sample seeds: a paired comparison, the two runs differ only in their initial weights). Its noise band is measured
  the same way: |FD(scratch) − FD(scratch with only the init seed changed)| (the init-only control: what a different
  random init alone moves FD by), or — without that control run — |FD(scratch, seed s) − FD(scratch, seed s+1)|
  (two runs of one recipe differing by chance in init, data order, noise and samples: wider, unpaired); and never
  below 2 × the combined bootstrap error of the two FDs compared (sample-size noise alone). Both bands are
  reported when both runs exist; the paired one decides, as it is the null of a paired comparison.
- training loss per logged interval, paired (same data order and noise in both arms): the relative gain
  (scratch − USP) / scratch, summarised over the second half of the run; its band is the same quantity between
  scratch and the init-only control (or, without it, between the two scratch seeds: unpaired, conservative).
- steps to reach: the first evaluated (logged) step at which the USP arm's FD (loss) is at or below the scratch
  arm's final FD (loss).
A USP arm "beats scratch beyond the band" only when its gain exceeds the band; otherwise the report says inside.
"""

from __future__ import annotations

import math
from statistics import mean

Log = tuple[list[dict], list[dict]]  # (training records, evaluations) as usp.train.engine.read_log returns


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def steps_to_reach(records: list[dict], target: float, key: str = "domain_fd") -> int | None:
    """First step whose `key` is at or below `target` (None if never)."""
    for record in records:
        if _finite(record.get(key)) and record[key] <= target:
            return record["step"]
    return None


def crossing_step(records: list[dict], target: float, key: str = "domain_fd") -> float | None:
    """The step where `key` first reaches `target`, linearly interpolated between the last evaluation above it and
    the first at or below it (None if never): a finer reading than `steps_to_reach` when evaluations are sparse."""
    previous = None
    for record in records:
        if not _finite(record.get(key)):
            continue
        if record[key] <= target:
            if previous is None or previous[key] == record[key]:
                return float(record["step"])
            fraction = (previous[key] - target) / (previous[key] - record[key])
            return previous["step"] + fraction * (record["step"] - previous["step"])
        previous = record
    return None


def fd_band(scratch_a: list[dict], scratch_b: list[dict], usp: list[dict],
            control: list[dict] | None = None) -> list[dict]:
    """Per evaluation step common to the runs: FDs, the seed spread, the init-only spread (with a control run),
    the bootstrap error and the band (paired when the control exists, else unpaired)."""
    runs = (usp, scratch_a, scratch_b, *([control] if control is not None else []))
    by_step = [{r["step"]: r for r in run if _finite(r.get("domain_fd"))} for run in runs]
    rows = []
    for step in sorted(set.intersection(*[set(m) for m in by_step])):
        u, a, b = (m[step] for m in by_step[:3])
        se = [r.get("domain_fd_se", math.nan) for r in (u, a)]
        combined = math.sqrt(se[0] ** 2 + se[1] ** 2) if all(_finite(x) for x in se) else math.nan
        floor = 2 * combined if _finite(combined) else 0.0
        spread = abs(a["domain_fd"] - b["domain_fd"])
        band_unpaired = max(spread, floor)
        row = {"step": step, "usp": u["domain_fd"], "scratch": a["domain_fd"], "scratch_other": b["domain_fd"],
               "usp_se": se[0], "scratch_se": se[1], "seed_spread": spread, "band_unpaired": band_unpaired}
        if control is not None:
            c = by_step[3][step]
            row.update(init_control=c["domain_fd"], init_spread=abs(a["domain_fd"] - c["domain_fd"]),
                       band_paired=max(abs(a["domain_fd"] - c["domain_fd"]), floor))
        row["band"] = row.get("band_paired", band_unpaired)
        row["gain"] = a["domain_fd"] - u["domain_fd"]  # > 0: USP better
        row["beyond"] = row["gain"] > row["band"]
        row["beyond_unpaired"] = row["gain"] > band_unpaired
        row["usp_agreement"] = u.get("class_agreement", math.nan)
        row["scratch_agreement"] = a.get("class_agreement", math.nan)
        rows.append(row)
    return rows


def paired_loss(usp: list[dict], scratch: list[dict], scratch_other: list[dict],
                control: list[dict] | None = None) -> dict:
    """Relative loss gain of USP over scratch at each common logged step, and the chance gap of scratch against
    the init-only control (or, without it, against the other scratch seed); summaries over the second half of the
    run (where both arms left the initial transient). With the control, the unpaired seed gap is reported too."""
    runs = (usp, scratch, scratch_other, *([control] if control is not None else []))
    maps = [{r["step"]: r["loss"] for r in run if _finite(r.get("loss"))} for run in runs]
    steps = sorted(set.intersection(*[set(m) for m in maps]))
    chance_of = maps[3] if control is not None else maps[2]
    rows = [{"step": s, "gain": (maps[1][s] - maps[0][s]) / maps[1][s],
             "chance": (maps[1][s] - chance_of[s]) / maps[1][s],
             "chance_unpaired": (maps[1][s] - maps[2][s]) / maps[1][s]} for s in steps]
    if not rows:
        return {"rows": [], "second_half": []}
    half = [r for r in rows if r["step"] > steps[-1] / 2] or rows[-1:]
    gains, chances = [r["gain"] for r in half], [abs(r["chance"]) for r in half]
    unpaired = [abs(r["chance_unpaired"]) for r in half]
    return {"rows": rows, "second_half": [r["step"] for r in half], "gain_mean": mean(gains),
            "gain_min": min(gains), "gain_max": max(gains), "chance_mean": mean(chances),
            "chance_max": max(chances), "paired": control is not None, "chance_unpaired_max": max(unpaired),
            "beyond": mean(gains) > max(chances), "beyond_unpaired": mean(gains) > max(unpaired)}


def family_verdict(logs: dict[str, Log], family: str, seeds: list[int], scratch_seeds: tuple[int, int],
                   controls: dict[int, str] | None = None) -> dict:
    """For each USP seed s: FD gain vs scratch seed s against the measured band, the paired loss gain against the
    chance gap, class agreement, and steps to reach scratch's final FD/loss. `logs` maps run keys
    `<family>_<init>_s<seed>[_w<init seed>]` to their read_log output; `controls` maps a seed to the key of its
    init-only control run (the paired band), when one ran."""
    a, b = scratch_seeds
    scratch = {s: logs[f"{family}_scratch_s{s}"] for s in scratch_seeds}
    out = {}
    for seed in seeds:
        usp_train, usp_evals = logs[f"{family}_usp_s{seed}"]
        own = seed if seed in scratch else a  # the paired scratch run; a USP seed without one is read against a
        other = b if own == a else a
        control = logs[controls[own]] if controls and own in controls else None
        band = fd_band(scratch[own][1], scratch[other][1], usp_evals, control[1] if control else None)
        loss = paired_loss(usp_train, scratch[own][0], scratch[other][0], control[0] if control else None)
        final_fd = scratch[own][1][-1].get("domain_fd", math.nan) if scratch[own][1] else math.nan
        final_loss = scratch[own][0][-1]["loss"] if scratch[own][0] else math.nan
        last = scratch[own][0][-1]["step"] if scratch[own][0] else None
        out[seed] = {"paired_with": own, "fd": band, "final": band[-1] if band else None, "loss": loss,
                     "fd_reached_at": steps_to_reach(usp_evals, final_fd),
                     "fd_crossing": crossing_step(usp_evals, final_fd),
                     "loss_reached_at": steps_to_reach(usp_train, final_loss, "loss"),
                     "scratch_final_fd": final_fd, "scratch_final_loss": final_loss, "scratch_steps": last}
    return out


def verdict_sentence(family_label: str, seed: int, v: dict, chance: float = 0.1) -> str:
    """One honest sentence per (family, seed): beyond the band, inside it, or worse."""
    final, loss = v["final"], v["loss"]
    if final is None:
        return f"{family_label}, seed {seed}: no common evaluation step (nothing to compare)."
    fd_word = ("beats scratch beyond the noise band" if final["beyond"] else
               "is worse than scratch beyond the noise band" if -final["gain"] > final["band"] else
               "is inside the noise band of scratch")
    if "band_paired" in final:
        band_text = (f"paired band ±{final['band']:.1f}: scratch {final['scratch']:.1f} vs the same run with another "
                     f"init seed {final['init_control']:.1f}, bootstrap SE {final['usp_se']:.1f} / "
                     f"{final['scratch_se']:.1f}; the unpaired spread to scratch seed {final['scratch_other']:.1f} "
                     f"gives ±{final['band_unpaired']:.1f}, which the gain "
                     f"{'also clears' if final['beyond_unpaired'] else 'does NOT clear'}")
    else:
        band_text = (f"band ±{final['band']:.1f}: scratch seeds {final['scratch']:.1f} / {final['scratch_other']:.1f}, "
                     f"bootstrap SE {final['usp_se']:.1f} / {final['scratch_se']:.1f}")
    text = (f"{family_label}, seed {seed}: at step {final['step']} USP {fd_word} in domain FD — "
            f"{final['usp']:.1f} vs {final['scratch']:.1f} (gain {final['gain']:+.1f}; {band_text})")
    if loss.get("rows"):
        loss_word = "beyond" if loss["beyond"] else "NOT beyond"
        direction = "lower" if loss["gain_mean"] >= 0 else "HIGHER"
        against = "scratch and the init-only control" if loss.get("paired") else "scratch seeds"
        text += (f"; paired training loss {abs(100 * loss['gain_mean']):.1f}% {direction} than scratch on average "
                 f"over steps "
                 f"{loss['second_half'][0]}–{loss['second_half'][-1]} (range {100 * loss['gain_min']:+.1f} to "
                 f"{100 * loss['gain_max']:+.1f}%), {loss_word} the chance gap between {against} (mean "
                 f"{100 * loss['chance_mean']:.1f}%, max {100 * loss['chance_max']:.1f}%)")
        if loss.get("paired"):
            text += (f" and {'beyond' if loss['beyond_unpaired'] else 'NOT beyond'} the unpaired gap between scratch "
                     f"seeds (max {100 * loss['chance_unpaired_max']:.1f}%)")
    agreement = final["usp_agreement"]
    text += (f"; class agreement {agreement:.2f} (USP) vs {final['scratch_agreement']:.2f} (scratch), "
             f"chance {chance:.2f}.")
    return text
