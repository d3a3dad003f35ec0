"""Evidence for issue 24 on Fashion-MNIST: a tiny LightningDiT from USP (an encoder of LightningDiT's blocks) vs from
scratch, two seeds, with the demo's paired noise band (scratch with only the init seed changed), and a tiny SiT from
scratch at the same budget. Reuses the demo's stages (small VAE, latent cache, domain classifier; usp.demo.pipeline)
and its default budget (400 fine-tuning steps × 128, one 2 000-sample evaluation; 1 200 pretraining steps) unless
told less (--pretrain-steps, --finetune-steps, --eval-samples; --quick: the demo's plumbing budget). Results and the
measured run: docs/lightningdit_fmnist.md.

    python scripts/lightningdit_fmnist.py --out lightning_out        # writes lightning_out/results.json, report.md
    python scripts/lightningdit_fmnist.py --out lightning_out --objective sit  # + LightningDiT, SiT's objective
    python scripts/lightningdit_fmnist.py --out lightning_out --sit-usp        # + SiT from USP (demo's encoder)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from usp.demo.pipeline import Arm, Demo

# The ablation of the training objective (--objective sit): the LightningDiT network trained with SiT's uniform t
# and plain MSE instead of logit-normal t and the added cosine term, to tell the network's part in the USP gain from
# the objective's.
SIT_OBJECTIVE = ("generation.t_sampling=uniform", "generation.cosine_loss=false")


class LightningEvidence(Demo):
    extra: tuple[str, ...] = ()  # overrides laid over the LightningDiT recipes (after the demo's own)

    def recipe(self, name: str, *overrides: str):
        return super().recipe(name, *overrides, *(self.extra if name.startswith("lightningdit") else ()))

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
                "loss_last": history[-1]["loss"], "steps": config.train.max_steps, "run_dir": str(config.run_dir)}

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

    def run_sit_usp(self, seeds: tuple[int, ...] = (0, 1)) -> dict:
        """SiT from USP as the demo runs it (the demo's `vit_t_2` pretraining, 1 200 steps), beside the arms of `run`,
        on the same VAE, cache and classifier: where each network lands from USP at this budget."""
        results = self.run()
        results["pretrain"] = self.stage("pretrain", self.pretrain)
        for seed in seeds:
            arm = Arm("sit", "usp", seed)
            results[arm.key] = self.stage(arm.key, lambda arm=arm: self.generate(arm, results["pretrain"]["weights"]))
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        return results

    def run_sit_objective(self, seeds: tuple[int, ...] = (0, 1)) -> dict:
        """The LightningDiT arms again with SiT's objective (SIT_OBJECTIVE), beside the SiT arms of `run` (which must
        have run: same VAE, cache, domain classifier and USP encoder); stage and run names end in `_sitobj`."""
        results = self.run()
        weights = results["pretrain_lightning"]["weights"]
        out = {k: v for k, v in results.items() if k.startswith("sit_")}
        for seed in seeds:
            for arm in (Arm("lightningdit", "usp", seed), Arm("lightningdit", "scratch", seed),
                        Arm("lightningdit", "scratch", seed, init_seed=10**4 + seed)):
                self.extra = (*SIT_OBJECTIVE, f"run.name=fmnist-{arm.key.replace('_', '-')}-sitobj")
                out[arm.key] = self.stage(f"{arm.key}_sitobj", lambda arm=arm: self.generate(arm, weights))
        self.extra = ()
        (self.out / "results_sit_objective.json").write_text(json.dumps(out, indent=1))
        return out


ARMS = (("lightningdit_usp", "LightningDiT from USP"), ("lightningdit_scratch", "LightningDiT scratch"),
        ("lightningdit_scratch_w", "LightningDiT scratch, init seed 10⁴+s"), ("sit_scratch", "SiT scratch"),
        ("sit_usp", "SiT from USP (the demo's encoder)"))


def run_key(arm: str, seed: int) -> str:
    """The stage key of an ARMS entry at a seed (the init-only control carries its init seed, 10⁴ + seed)."""
    return f"{arm.removesuffix('_w')}_s{seed}" + (f"_w{10**4 + seed}" if arm.endswith("_w") else "")


def report(results: dict, out: Path) -> str:
    """Markdown: a table per arm and seed (FD ± bootstrap error, class agreement, the last quarter's mean loss and
    MSE, wall time and load), the demo's verdict per seed (usp.demo.verdict: the paired band is |FD(scratch) −
    FD(scratch, init seed only changed)|, never below 2 × the combined bootstrap error of USP and scratch; the
    unpaired band from the two scratch seeds beside it; the paired training loss against the init-only chance gap),
    LightningDiT vs SiT from scratch at the same budget against the unpaired seed spread, and loss curves (`out`)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usp.demo.verdict import family_verdict, verdict_sentence
    from usp.run.log import read_log

    seeds = sorted({v["arm"]["seed"] for v in results.values() if isinstance(v, dict) and "arm" in v})
    logs = {key: read_log(Path(value["run_dir"])) for key, value in results.items()
            if isinstance(value, dict) and "arm" in value}
    lines = ["| seed | arm | FD (domain) | class agreement | loss, last quarter (mean) | MSE, last quarter (mean) | "
             "wall time (1-min load at start–end) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seed in seeds:
        for arm, label in ARMS:
            key = run_key(arm, seed)
            if key not in results:
                continue
            history = logs[key][0]
            tail = history[len(history) * 3 // 4:]
            loss = sum(h["loss"] for h in tail) / len(tail)
            mse = sum(h.get("mse", h["loss"]) for h in tail) / len(tail)
            final, r = results[key]["final"], results[key]
            lines.append(f"| {seed} | {label} | {final['domain_fd']:.1f} ± {final['domain_fd_se']:.1f} | "
                         f"{final['class_agreement']:.2f} | {loss:.4f} | {mse:.4f} | {r['seconds']:.0f} s "
                         f"({r['load'][0]:.1f}–{r['load'][1]:.1f}) |")
            if not arm.endswith("_w"):
                style = "-" if seed == seeds[0] else "--"
                axes[0].plot([h["step"] for h in history], [h["loss"] for h in history], style,
                             label=f"{label}, seed {seed}")
                axes[1].plot([h["step"] for h in history], [h.get("mse", h["loss"]) for h in history], style,
                             label=f"{label}, seed {seed}")
    text = ["\n".join(lines), ""]
    if all(run_key(a, s) in logs for a, _ in ARMS[:3] for s in seeds) and len(seeds) == 2:
        controls = {s: run_key("lightningdit_scratch_w", s) for s in seeds}
        verdict = family_verdict(logs, "lightningdit", seeds, (seeds[0], seeds[1]), controls)
        text += [f"- {verdict_sentence('LightningDiT-T/2', s, verdict[s])}" for s in seeds]
    if all(run_key(a, s) in results for a in ("lightningdit_scratch", "sit_scratch") for s in seeds):
        fd = {(a, s): results[run_key(a, s)]["final"] for a in ("lightningdit_scratch", "sit_scratch") for s in seeds}
        spreads = [abs(fd[a, seeds[0]]["domain_fd"] - fd[a, seeds[-1]]["domain_fd"])
                   for a in ("lightningdit_scratch", "sit_scratch")]
        for s in seeds:
            light, sit = fd["lightningdit_scratch", s], fd["sit_scratch", s]
            band = max(max(spreads), 2 * math.hypot(light["domain_fd_se"], sit["domain_fd_se"]))
            gain = sit["domain_fd"] - light["domain_fd"]
            word = "better than" if gain > band else "worse than" if -gain > band else "inside the band of"
            text.append(f"- seed {s}, same budget, both from scratch: LightningDiT {light['domain_fd']:.1f} vs SiT "
                        f"{sit['domain_fd']:.1f} (LightningDiT {gain:+.1f} better) against an unpaired band of "
                        f"±{band:.1f} (the larger scratch seed spread, or 2 × the combined bootstrap error): "
                        f"LightningDiT is **{word}** SiT.")
    for ax, what in zip(axes, ("training loss (LightningDiT: MSE + cosine; SiT: MSE)",
                               "velocity MSE (each family at its own t distribution)")):
        ax.set_xlabel("step")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lightning_out")
    parser.add_argument("--pretrain-steps", type=int)
    parser.add_argument("--finetune-steps", type=int)
    parser.add_argument("--eval-samples", type=int)
    parser.add_argument("--quick", action="store_true", help="the demo's plumbing budget (numbers mean nothing)")
    parser.add_argument("--objective", choices=("lightningdit", "sit"), default="lightningdit",
                        help="sit: also the LightningDiT arms with SiT's objective (uniform t, MSE only)")
    parser.add_argument("--sit-usp", action="store_true", help="also SiT from USP (the demo's pretraining and arm)")
    args = parser.parse_args()
    evidence = LightningEvidence(Path(args.out), quick=args.quick, seed=0)
    changes = {"pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
               "eval_samples": args.eval_samples}
    evidence.spend = dataclasses.replace(evidence.spend, **{k: v for k, v in changes.items() if v is not None})
    if args.finetune_steps:
        evidence.spend = dataclasses.replace(evidence.spend, eval_every=args.finetune_steps)
    results = evidence.run_sit_usp() if args.sit_usp else evidence.run()
    (Path(args.out) / "report.md").write_text(report(results, Path(args.out) / "loss.png"))
    if args.objective == "sit":
        ablation = evidence.run_sit_objective()
        (Path(args.out) / "report_sit_objective.md").write_text(report(ablation, Path(args.out) / "loss_sitobj.png"))
