"""Evidence for issue 24 on Fashion-MNIST: a tiny LightningDiT from USP (an encoder of LightningDiT's blocks) vs from
scratch, two seeds, with the demo's paired noise band (scratch with only the init seed changed), and a tiny SiT from
scratch at the same budget. Reuses the demo's stages (small VAE, latent cache, domain classifier; usp.demo.pipeline)
and its default budget (400 fine-tuning steps × 128, one 2 000-sample evaluation; 1 200 pretraining steps) unless
told less (the issue-24 run, on a shared, loaded machine, used --pretrain-steps 300 --finetune-steps 200
--eval-samples 1000).

    python scripts/lightningdit_fmnist.py --out lightning_out        # writes lightning_out/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from usp.demo.pipeline import Arm, Demo


class LightningEvidence(Demo):
    def pretrain_lightning(self) -> dict:
        from usp.run.checkpoint import latest_weights
        from usp.run.log import read_log
        from usp.train.engine import train
        from usp.train.tasks import build_task

        config = self.recipe("pretrain_lightning", *self.latent_overrides(),
                             f"train.max_steps={self.budget('pretrain_steps')}")
        train(config, build_task(config), resume="auto")
        history, _ = read_log(config.run_dir)
        return {"weights": str(latest_weights(config.run_dir / "checkpoints")), "loss_first": history[0]["loss"],
                "loss_last": history[-1]["loss"], "steps": config.train.max_steps}

    def run(self, seeds: tuple[int, ...] = (0, 1)) -> dict:
        results = {"vae": self.stage("vae", self.vae), "cache": self.stage("cache", self.cache),
                   "domain": self.stage("domain", self.domain)}
        results["pretrain_lightning"] = self.stage("pretrain_lightning", self.pretrain_lightning)
        weights = results["pretrain_lightning"]["weights"]
        for seed in seeds:
            for arm in (Arm("lightningdit", "usp", seed), Arm("lightningdit", "scratch", seed),
                        Arm("lightningdit", "scratch", seed, init_seed=10**4 + seed), Arm("sit", "scratch", seed)):
                results[arm.key] = self.stage(arm.key, lambda arm=arm: self.generate(arm, weights))
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        return results


ARMS = (("lightningdit_usp", "LightningDiT from USP"), ("lightningdit_scratch", "LightningDiT scratch"),
        ("lightningdit_scratch_w", "LightningDiT scratch, init seed 10⁴+s"), ("sit_scratch", "SiT scratch"))


def report(results: dict, out: Path) -> str:
    """Markdown table (FD ± bootstrap error, class agreement, wall time, mean loss of the last quarter), the paired
    band (scratch vs scratch with only the init seed changed, at least twice the combined bootstrap error, as the
    demo), the verdict per seed, and a loss-curve plot `out`."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usp.run.log import read_log

    seeds = sorted({v["arm"]["seed"] for v in results.values() if isinstance(v, dict) and "arm" in v})
    lines = ["| seed | arm | FD (domain) | class agreement | loss (mean, last quarter) | wall time (load) |",
             "| --- | --- | --- | --- | --- | --- |"]
    verdicts, fig = [], plt.figure(figsize=(7, 4))
    for seed in seeds:
        row = {}
        for key, label in ARMS:
            name = f"{key.removesuffix('_w')}_s{seed}" + (f"_w{10**4 + seed}" if key.endswith("_w") else "")
            if name not in results:
                continue
            r = results[name]
            history, _ = read_log(Path(r["run_dir"]))
            losses = [h["loss"] for h in history]
            tail = losses[len(losses) * 3 // 4:]
            final = r["final"]
            row[key] = (final["domain_fd"], final["domain_fd_se"], sum(tail) / len(tail))
            lines.append(f"| {seed} | {label} | {final['domain_fd']:.1f} ± {final['domain_fd_se']:.1f} | "
                         f"{final['class_agreement']:.2f} | {row[key][2]:.4f} | {r['seconds']:.0f} s "
                         f"({r['load'][0]:.1f}–{r['load'][1]:.1f}) |")
            if not key.endswith("_w"):
                plt.plot([h["step"] for h in history], losses, label=f"{label}, seed {seed}",
                         linestyle="-" if seed == seeds[0] else "--")
        if {"lightningdit_usp", "lightningdit_scratch", "lightningdit_scratch_w"} <= set(row):
            (fd_u, _, loss_u), (fd_s, se_s, loss_s), (fd_c, se_c, loss_c) = (
                row["lightningdit_usp"], row["lightningdit_scratch"], row["lightningdit_scratch_w"])
            band = max(abs(fd_s - fd_c), 2 * math.hypot(se_s, se_c))
            gain = fd_s - fd_u
            verdicts.append(f"seed {seed}: FD gain of USP over scratch {gain:+.1f} against a paired band of "
                            f"±{band:.1f}: **{'beyond' if gain > band else 'inside'} the band**; mean loss of the "
                            f"last quarter {100 * (loss_s - loss_u) / loss_s:+.1f} % vs scratch (init-only control: "
                            f"{100 * (loss_s - loss_c) / loss_s:+.1f} %)")
    plt.xlabel("step")
    plt.ylabel("training loss (LightningDiT: MSE + cosine; SiT: MSE)")
    plt.yscale("log")
    plt.legend(fontsize=7)
    plt.tight_layout()
    fig.savefig(out, dpi=100)
    return "\n".join(lines + [""] + [f"- {v}" for v in verdicts]) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lightning_out")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    parser.add_argument("--eval-samples", type=int)
    args = parser.parse_args()
    evidence = LightningEvidence(Path(args.out), quick=False, seed=0)
    changes = {"pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
               "eval_samples": args.eval_samples}
    evidence.plan = dataclasses.replace(evidence.plan, **{k: v for k, v in changes.items() if v is not None})
    if args.finetune_steps:
        evidence.plan = dataclasses.replace(evidence.plan, eval_every=args.finetune_steps)
    results = evidence.run()
    (Path(args.out) / "report.md").write_text(report(results, Path(args.out) / "loss.png"))
