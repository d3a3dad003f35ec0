"""How long to pretrain: the speed-up of USP fine-tuning as a function of pretraining images (issue 25).

One resumable driver over the public CLI and the Fashion-MNIST recipes (configs/fmnist, configs/curve):

  set-up    VAE, latent cache, domain classifier, FD reference        (as `usp demo` does, same budgets)
  pretrain  ONE constant-lr run of the demo's encoder, checkpoints kept at 1/16 … 1 of the total
  ft        SiT-T/2 and DiT-T/2 from scratch, from each kept checkpoint, and the init-only scratch control, at two
            seeds, paired as in the demo (same run seed: data order, noise and sample seeds; only the init differs)
  probe     the paper's linear probe (LARS) and logistic regression at each checkpoint and at random init
  report    docs/curve/: table, plot, reference curves (scripts/curve_report.py, from the logs alone)

Every job is a separate `python -m usp ...` process writing its own run folder; a job is done when its marker
exists, so the command can be re-run until everything is done (an interrupted run resumes from its checkpoint).
Several drivers may run side by side (the same command again): each claims the next job whose inputs exist
with an exclusive lock file.

  python scripts/curve.py run --out curve_out           # everything (re-run after a stop)
  python scripts/curve.py report --out curve_out        # copy the logs to docs/curve/logs and write the report
  python scripts/curve_report.py docs/curve             # the report again from the committed logs, no training
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = [sys.executable, "-m", "usp"]

# ---- the design (docs/curve/README.md says why) ------------------------------------------------------------------
IMAGES = 20_000  # training images cached (the demo's default)
PRETRAIN_STEPS, PRETRAIN_BATCH = 640, 256  # 163 840 images = 20 x the fine-tuning images below (the paper's proportion)
KEPT = (80, 160, 320, 640)  # 1/8, 1/4, 1/2, 1 of the total (2.5:1 … 20:1)
FT_STEPS, FT_BATCH = 128, 64  # 8 192 images per fine-tune
EVAL_EVERY, EVAL_SAMPLES = 32, 500  # 4 FD evaluations per run (+ the loss every 8 steps): the curves read
SEEDS, FAMILIES = (0, 1), ("sit", "dit")
PROBE_TRAIN, PROBE_EPOCHS, PROBE_BATCH = 10_000, 5, 256  # the demo's probe budget


def common(out: Path) -> list[str]:
    return [f"run.out_dir={out / 'runs'}", "train.progress=false", "train.tensorboard=false", "data.num_workers=0",
            f"data.limit={IMAGES}"]


def latent(out: Path) -> list[str]:
    return [f"latent.path={out / 'vae'}", f"latent.cache={out / 'latents'}"]


def weights(out: Path, step: int) -> Path:
    return out / "runs" / "curve-pretrain" / "checkpoints" / f"weights_{step:07d}.safetensors"


class Job:
    def __init__(self, name: str, argv: list[str] | None, needs: list[Path], fn=None):
        self.name, self.argv, self.needs, self.fn = name, argv, needs, fn


def jobs(out: Path) -> list[Job]:
    c, lat = common(out), latent(out)
    todo = [
        Job("vae", [*PY, "train-vae", "fmnist/vae", *c, "train.max_steps=150", f"vae.out={out / 'vae'}"], []),
        Job("cache", [*PY, "cache-latents", "fmnist/pretrain", *c, *lat, "--splits", "train", "test",
                      "--batch-size", "500"], [out / "vae" / "latent_stats.json"]),
        Job("domain", [sys.executable, "-c", "import sys; from usp.evaluate.domain import train_domain_classifier "
                       "as t; print('test accuracy', t(sys.argv[1], epochs=2, seed=0)[1])",
                       str(out / "domain.safetensors")], []),
        Job("reference", None, [], fn=lambda: write_reference(out / "domain_reference.npz")),
        Job("pretrain", [*PY, "pretrain", "fmnist/pretrain", *c, *lat, "run.name=curve-pretrain", "run.seed=0",
                         f"train.max_steps={PRETRAIN_STEPS}", f"train.global_batch={PRETRAIN_BATCH}",
                         f"train.ckpt_every={KEPT[0]}", "train.keep_last=100", "train.log_every=20"],
            [out / "stages" / "cache.done"]),
    ]
    ready = [out / "stages" / f"{n}.done" for n in ("cache", "domain", "reference")]
    finetunes = {}
    for seed in SEEDS:
        for family in FAMILIES:
            for tag, init_step in (("scratch", None), ("ctrl", None), *((f"usp{k}", k) for k in KEPT)):
                init = "usp" if init_step else "scratch"
                name = f"curve-{family}-{tag}-s{seed}"
                argv = [*PY, "finetune", f"fmnist/{family}_{init}", *c, *lat, f"run.name={name}", f"run.seed={seed}",
                        f"train.max_steps={FT_STEPS}", f"train.global_batch={FT_BATCH}",
                        f"train.eval_every={EVAL_EVERY}", "train.log_every=8", f"train.ckpt_every={FT_STEPS // 2}",
                        "train.keep_last=2", f"generation.eval_samples={EVAL_SAMPLES}",
                        f"generation.domain_classifier={out / 'domain.safetensors'}",
                        f"generation.domain_reference={out / 'domain_reference.npz'}"]
                needs = list(ready)
                if init_step:
                    argv.append(f"model.init={weights(out, init_step)}")
                    needs.append(weights(out, init_step))
                if tag == "ctrl":
                    argv.append(f"model.init_seed={10**4 + seed}")  # init-only control: the paired noise band
                finetunes[name] = Job(name, argv, needs)
    # Priority (what a stop leaves out last): the first seed's whole curve, the fast probes, the second seed at the
    # paper's proportion, the paper's probes, then the rest of the second seed.
    key = lambda j: ("usp" in j.name and f"usp{KEPT[-1]}-" not in j.name, j.name)  # noqa: E731
    first = sorted((j for n, j in finetunes.items() if n.endswith(f"-s{SEEDS[0]}")), key=key)
    second = sorted((j for n, j in finetunes.items() if not n.endswith(f"-s{SEEDS[0]}")), key=key)
    second_main = [j for j in second if not key(j)[0]]
    fast = [probe_job(out, step, fast=True) for step in (KEPT[-1], 0, *KEPT[:-1])]
    raw = Job("probe-raw-pixels", [sys.executable, "-c", RAW_PIXELS, str(PROBE_TRAIN),
                                   str(out / "runs" / "probe-raw-pixels.json")], [])
    paper = [probe_job(out, step, fast=False) for step in (KEPT[-1], 0, *KEPT[:-1])]
    return todo + first + fast + [raw] + second_main + paper + [j for j in second if key(j)[0]]


RAW_PIXELS = """import json, sys, time, torch
from usp.data.fashion_mnist import load_fashion_mnist
from usp.evaluate.probes import logistic_regression
limit = int(sys.argv[1])
(train_x, train_y), (test_x, test_y) = load_fashion_mnist(None, 'train'), load_fashion_mnist(None, 'test')
flat = lambda x: torch.tensor(x.reshape(len(x), -1), dtype=torch.float32)
start = time.time()
result = logistic_regression(flat(train_x[:limit]), torch.tensor(train_y[:limit]), flat(test_x), torch.tensor(test_y))
json.dump({'logistic_top1': result['top1'], 'train_images': limit, 'seconds': time.time() - start},
          open(sys.argv[2], 'w'))
"""  # logistic regression on raw 28x28 pixels (as the demo's raw_pixel_probe): the floor a useful encoder must clear


def probe_job(out: Path, step: int, fast: bool) -> Job:
    init = str(weights(out, step)) if step else "null"
    name = f"probe-{'random' if not step else f'usp{step}'}" + ("-fast" if fast else "")
    argv = [*PY, "probe", "fmnist/probe", *common(out)[:-1], *latent(out), f"data.limit={PROBE_TRAIN}",
            f"model.init={init}", f"run.name={name}", f"train.epochs={PROBE_EPOCHS}",
            f"train.global_batch={PROBE_BATCH}", *(["--fast"] if fast else [])]
    return Job(name, argv, [out / "stages" / "cache.done", *([weights(out, step)] if step else [])])


def write_reference(path: Path) -> None:
    """The real side of the domain FD: every Fashion-MNIST test image padded to 32 px, as the demo writes it."""
    import numpy as np

    from usp.data.fashion_mnist import load_fashion_mnist
    from usp.evaluate.reference import write_sample_npz

    images = load_fashion_mnist(None, "test")[0]
    write_sample_npz(path, np.repeat(np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1))


def claim(lock: Path) -> bool:
    """An exclusive lock file holding our pid; a lock whose process is gone is stale and taken over."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(lock)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def run_job(out: Path, job: Job) -> None:
    stages = out / "stages"
    log_path = out / "logs" / f"{job.name}.log"
    start, load = time.time(), os.getloadavg()[0]
    print(f"[curve] {time.strftime('%H:%M:%S')} {job.name} ...", flush=True)
    if job.fn is not None:
        job.fn()
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if job.name != "pretrain":  # tiny models: one thread each, lanes side by side (2 threads oversubscribe)
            env.setdefault("OMP_NUM_THREADS", "1")
        with open(log_path, "a") as log:
            code = subprocess.call(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if code:
            raise SystemExit(f"[curve] {job.name} failed (exit {code}); see {log_path}, fix, and re-run")
    record = {"seconds": round(time.time() - start, 1), "load": [round(load, 2), round(os.getloadavg()[0], 2)],
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": job.argv}
    (stages / f"{job.name}.done").write_text(json.dumps(record, indent=1))
    print(f"[curve] {job.name}: {record['seconds']} s (load {record['load']})", flush=True)


def run(out: Path, only: str | None = None) -> None:
    for sub in ("stages", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    while True:
        pending = [j for j in jobs(out) if not (out / "stages" / f"{j.name}.done").exists()
                   and (only is None or j.name.startswith(only))]
        if not pending:
            print("[curve] all jobs done")
            return
        for job in pending:
            if all(p.exists() for p in job.needs) and claim(lock := out / "stages" / f"{job.name}.lock"):
                try:
                    run_job(out, job)
                finally:
                    lock.unlink(missing_ok=True)
                break
        else:
            time.sleep(15)  # waiting for a checkpoint, or for the other lane


def collect(out: Path, docs: Path) -> None:
    """Copy what the report reads (logs, results, stage times) into docs/curve/logs: small, committed."""
    dest = docs / "logs"
    dest.mkdir(parents=True, exist_ok=True)
    for run_dir in sorted((out / "runs").iterdir()):
        for name in ("log.jsonl", "evals.jsonl", "result.json", "config.yaml"):
            if (run_dir / name).exists():
                (dest / run_dir.name).mkdir(exist_ok=True)
                shutil.copy2(run_dir / name, dest / run_dir.name / name)
        grids = sorted(run_dir.glob("**/*.png"))
        if grids and run_dir.name.endswith("-s0"):
            shutil.copy2(grids[-1], dest / run_dir.name / "grid_final.png")
    (dest / "stages").mkdir(exist_ok=True)
    for path in sorted((out / "stages").glob("*.done")):
        shutil.copy2(path, dest / "stages" / (path.stem + ".json"))
    for path in sorted((out / "logs").glob("probe-*fast.log")):
        shutil.copy2(path, dest / "stages" / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--out", default="curve_out", help="working folder (runs, caches; not committed)")
    parser.add_argument("--only", help="run only the jobs whose name starts with this (e.g. probe-)")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "curve"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.command == "run":
        run(out, args.only)
    else:
        collect(out, Path(args.docs))
        subprocess.check_call([sys.executable, str(ROOT / "scripts" / "curve_report.py"), args.docs])


if __name__ == "__main__":
    main()
