"""Evidence for issue 24 on Fashion-MNIST: a tiny LightningDiT from USP (an encoder of LightningDiT's blocks) vs from
scratch, two seeds, with the demo's paired noise band (scratch with only the init seed changed), and a tiny SiT from
scratch at the same budget. Reuses the demo's stages (small VAE, latent cache, domain classifier; usp.demo.pipeline)
and its default budget (400 fine-tuning steps × 128, one 2 000-sample evaluation; 1 200 pretraining steps).

    python scripts/lightningdit_fmnist.py --out lightning_out        # writes lightning_out/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from usp.demo.pipeline import Arm, Demo


class LightningEvidence(Demo):
    def pretrain_lightning(self) -> dict:
        from usp.train.checkpoint import latest_weights
        from usp.train.engine import read_log, train
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lightning_out")
    args = parser.parse_args()
    LightningEvidence(Path(args.out), quick=False, seed=0).run()
