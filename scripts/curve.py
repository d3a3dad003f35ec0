"""How long to pretrain: the speed-up of USP fine-tuning as a function of pretraining images (issue 25).

One resumable driver over the public CLI and the Fashion-MNIST recipes (configs/fmnist):

  set-up    VAE, latent cache, domain classifier, FD reference        (as `usp demo` does, same budgets)
  pretrain  ONE constant-lr run of the demo's encoder, checkpoints kept at 1/16 … 1 of the total
  ft        SiT-T/2 and DiT-T/2 from scratch, from each kept checkpoint, and the init-only scratch control, at two
            seeds, paired as in the demo (same run seed: data order, noise and sample seeds; only the init differs)
  probe     the paper's linear probe (LARS) and logistic regression at each checkpoint and at random init
  report    docs/curve/: table, plot, reference curves (scripts/curve_report.py, from the logs alone)

Every job is a separate `python -m usp ...` process writing its own run folder; a job is done when its marker
exists, so the command can be re-run until everything is done (an interrupted run resumes from its checkpoint).
The design runs as ONE lane, one thread per job (the machine is shared); several drivers may still run side by
side (the same command again): each claims the next job whose inputs exist with an exclusive lock file. A job
that fails is reported and skipped; the driver exits 1 and the next run retries it.

  python scripts/curve.py run --out curve_out           # everything (re-run after a stop)
  python scripts/curve.py run --out curve_out --setup-from demo_out   # the same, set-up copied from `usp demo`
  python scripts/curve.py report --out curve_out        # copy the logs to docs/curve/logs and write the report
  python scripts/curve_report.py docs/curve             # the report again from the committed logs, no training
"""

from __future__ import annotations

import argparse
import fcntl
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
FT_STEPS, FT_BATCH = 400, 128  # the demo's default fine-tuning (EMA 0.99 from the recipes): 51 200 images per run
PRETRAIN_BATCH = 256
PRETRAIN_STEPS = 20 * FT_STEPS * FT_BATCH // PRETRAIN_BATCH  # 4 000 steps = 1 024 000 images: the paper's 20:1
KEPT = tuple(PRETRAIN_STEPS // 2**k for k in (4, 3, 2, 1, 0))  # 250 … 4 000 steps: 1/16 … 1 of the total
PRETRAIN_LOG = 25
EVAL_EVERY, EVAL_SAMPLES = 50, 500  # 8 FD evaluations per run: steps-to-reach is read from the curve
FT_LOG = 10  # training loss every 10 steps (the report smooths over 4 records)
SEEDS, FAMILIES = (0, 1), ("sit", "dit")
PROBE_TRAIN, PROBE_EPOCHS, PROBE_BATCH = 10_000, 5, 256  # the demo's probe budget
# Precision per stage, explicit so the curve does not depend on the machine's `train.amp: auto` (bf16/fp32 step
# ratios measured by benchmarks/bench_amp_cpu.py on this CPU: pretraining 0.73, SiT-T/2 1.10, DiT-T/2 1.11).
PRETRAIN_AMP, FT_AMP, PROBE_AMP = "bf16", "fp32", "fp32"
SETUP = ("vae", "cache", "domain", "reference")
DESIGN = {"ft_steps": FT_STEPS, "ft_batch": FT_BATCH, "kept": list(KEPT), "pretrain_batch": PRETRAIN_BATCH,
          "eval_every": EVAL_EVERY, "eval_samples": EVAL_SAMPLES, "ft_log": FT_LOG, "seeds": list(SEEDS),
          "families": list(FAMILIES), "precision": {"pretrain": PRETRAIN_AMP, "finetune": FT_AMP,
                                                    "probe": PROBE_AMP}}


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


def finetune_job(out: Path, family: str, tag: str, seed: int) -> Job:
    init_step = int(tag[3:]) if tag.startswith("usp") else None
    name = f"curve-{family}-{tag}-s{seed}"
    argv = [*PY, "finetune", f"fmnist/{family}_{'usp' if init_step else 'scratch'}", *common(out), *latent(out),
            f"run.name={name}", f"run.seed={seed}", f"train.max_steps={FT_STEPS}", f"train.global_batch={FT_BATCH}",
            "train.ema_decay=0.99", f"train.amp={FT_AMP}", f"generation.amp={FT_AMP}",
            f"train.eval_every={EVAL_EVERY}", f"train.log_every={FT_LOG}", f"train.ckpt_every={EVAL_EVERY}",
            "train.keep_last=2", f"generation.eval_samples={EVAL_SAMPLES}",
            f"generation.domain_classifier={out / 'domain.safetensors'}",
            f"generation.domain_reference={out / 'domain_reference.npz'}"]
    needs = [out / "stages" / f"{n}.done" for n in ("cache", "domain", "reference")]
    if init_step:
        argv.append(f"model.init={weights(out, init_step)}")
        needs.append(weights(out, init_step))
    if tag == "ctrl":
        argv.append(f"model.init_seed={10**4 + seed}")  # init-only control: the paired noise band
    return Job(name, argv, needs)


def jobs(out: Path) -> list[Job]:
    """Every job, in the order one lane runs them: what a stop leaves undone is the least needed."""
    c, lat = common(out), latent(out)
    todo = [
        Job("vae", [*PY, "train-vae", "fmnist/vae", *c, "train.max_steps=150", f"vae.out={out / 'vae'}"], []),
        Job("cache", [*PY, "cache-latents", "fmnist/pretrain", *c, *lat, "--splits", "train", "test",
                      "--batch-size", "500"], [out / "vae" / "latent_stats.json"]),
        Job("domain", [sys.executable, "-c", "import sys; from usp.evaluate.domain import train_domain_classifier "
                       "as t; print('test accuracy', t(sys.argv[1], epochs=2, seed=0)[1])",
                       str(out / "domain.safetensors")], []),
        Job("reference", None, [], fn=lambda: write_reference(out)),
        Job("pretrain", [*PY, "pretrain", "fmnist/pretrain", *c, *lat, "run.name=curve-pretrain", "run.seed=0",
                         f"train.max_steps={PRETRAIN_STEPS}", f"train.global_batch={PRETRAIN_BATCH}",
                         f"train.amp={PRETRAIN_AMP}", f"train.ckpt_every={KEPT[0]}", "train.keep_last=1000",
                         f"train.log_every={PRETRAIN_LOG}"],
            [out / "stages" / "cache.done"]),
    ]
    top, rest = f"usp{KEPT[-1]}", [f"usp{k}" for k in reversed(KEPT[:-1])]
    first = [finetune_job(out, f, tag, SEEDS[0]) for f in FAMILIES for tag in ("scratch", "ctrl", top)]
    first += [finetune_job(out, f, tag, SEEDS[0]) for tag in rest for f in FAMILIES]
    probes = [probe_job(out, step, fast) for step in (KEPT[-1], 0, *reversed(KEPT[:-1])) for fast in (True, False)]
    raw = Job("probe-raw-pixels", [sys.executable, "-c", RAW_PIXELS, str(PROBE_TRAIN),
                                   str(out / "runs" / "probe-raw-pixels.json")], [])
    second = [finetune_job(out, f, tag, seed) for seed in SEEDS[1:] for f in FAMILIES
              for tag in ("scratch", "ctrl", top)]
    second += [finetune_job(out, f, tag, seed) for seed in SEEDS[1:] for tag in rest for f in FAMILIES]
    return todo + first + probes + [raw] + second


RAW_PIXELS = ("import json, sys; from usp.demo.pipeline import raw_pixel_probe; r = raw_pixel_probe(int(sys.argv[1])); "
              "json.dump({'logistic_top1': r['logistic_top1'], 'train_images': int(sys.argv[1]), "
              "'seconds': r['seconds']}, open(sys.argv[2], 'w'))")  # the demo's floor a useful encoder must clear


def probe_job(out: Path, step: int, fast: bool) -> Job:
    init = str(weights(out, step)) if step else "null"
    name = f"probe-{'random' if not step else f'usp{step}'}" + ("-fast" if fast else "")
    argv = [*PY, "probe", "fmnist/probe", *common(out)[:-1], *latent(out), f"data.limit={PROBE_TRAIN}",
            f"model.init={init}", f"run.name={name}", f"train.epochs={PROBE_EPOCHS}",
            f"train.global_batch={PROBE_BATCH}", "train.min_steps=0", f"train.amp={PROBE_AMP}",
            *(["--fast"] if fast else [])]
    return Job(name, argv, [out / "stages" / "cache.done", *([weights(out, step)] if step else [])])


def write_reference(out: Path) -> None:
    from usp.demo.pipeline import write_domain_reference  # the demo's: every test image padded to 32 px

    write_domain_reference(out / "domain_reference.npz")


def claim(lock: Path) -> int | None:
    """An exclusive flock on the job's lock file: the open descriptor while we hold it, None when another lane
    does. The kernel releases it when the holder exits or is killed, so a stop never leaves a stale claim (a pid
    in a file would: after a restart the pid may belong to another process)."""
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def held(lock: Path) -> bool:
    """Whether another lane holds this job's claim now."""
    fd = claim(lock)
    if fd is None:
        return True
    os.close(fd)
    return False


def release(lock: Path, fd: int) -> None:
    lock.unlink(missing_ok=True)
    os.close(fd)


def run_job(out: Path, job: Job) -> bool:
    """Run one job to its marker; False when it failed (its log says why; the next run of the driver retries)."""
    stages = out / "stages"
    log_path = out / "logs" / f"{job.name}.log"
    start, load = time.time(), os.getloadavg()[0]
    print(f"[curve] {time.strftime('%H:%M:%S')} {job.name} ...", flush=True)
    if job.fn is not None:
        job.fn()
    else:
        # One lane, one thread (the machine is shared; docs/curve/README.md): an explicit OMP_NUM_THREADS wins.
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(log_path, "a") as log:
            log.write(f"\n[curve] {time.strftime('%Y-%m-%d %H:%M:%S')} start, load {load:.2f}\n")
            log.flush()
            code = subprocess.call(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if code:
            print(f"[curve] {job.name} failed (exit {code}); see {log_path}; the other jobs go on", flush=True)
            return False
    record = {"seconds": round(time.time() - start, 1), "load": [round(load, 2), round(os.getloadavg()[0], 2)],
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": job.argv}
    (stages / f"{job.name}.done").write_text(json.dumps(record, indent=1))
    print(f"[curve] {job.name}: {record['seconds']} s (load {record['load']})", flush=True)
    return True


def adopt_setup(out: Path, demo: Path) -> None:
    """Take the VAE, latent cache, domain classifier and FD reference of a finished `usp demo` (default budgets:
    the same set-up this script would build) instead of building them again. Copied, not linked: the demo
    folder may be deleted later. The latent cache's header fingerprints the VAE, so a mismatch is refused at load."""
    stages = out / "stages"
    if all((stages / f"{n}.done").exists() for n in SETUP):
        return
    demo_stages = {n: json.loads((demo / "stages" / f"{n}.json").read_text()) for n in ("vae", "cache", "domain")}
    if demo_stages["vae"].get("steps") != 150 or demo_stages["cache"].get("train") != IMAGES:
        raise SystemExit(f"[curve] {demo} is not a default `usp demo` (VAE steps {demo_stages['vae'].get('steps')}, "
                         f"cached images {demo_stages['cache'].get('train')}); build the set-up here instead")
    for name in ("vae", "latents"):
        if not (out / name).exists():
            shutil.copytree(demo / name, out / f"{name}.tmp", dirs_exist_ok=True)
            (out / f"{name}.tmp").rename(out / name)
    for name in ("domain.safetensors", "domain_reference.npz"):
        if not (out / name).exists():
            shutil.copy2(demo / name, out / f"{name}.tmp")
            (out / f"{name}.tmp").rename(out / name)
    for stage, source in (("vae", "vae"), ("cache", "cache"), ("domain", "domain"), ("reference", "domain")):
        record = {"seconds": 0.0, "load": [round(os.getloadavg()[0], 2)] * 2,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": None, "copied_from": str(demo),
                  "demo_stage": demo_stages[source]}
        (stages / f"{stage}.done").write_text(json.dumps(record, indent=1))
    print(f"[curve] set-up copied from {demo}", flush=True)


def run(out: Path, only: str | None = None, setup_from: Path | None = None) -> None:
    for sub in ("stages", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "design.json").write_text(json.dumps(DESIGN, indent=1))
    if setup_from is not None:
        adopt_setup(out, setup_from)
    failed: set[str] = set()
    while True:
        pending = [j for j in jobs(out) if not (out / "stages" / f"{j.name}.done").exists()
                   and j.name not in failed and (only is None or j.name.startswith(only))]
        if not pending:
            print("[curve] all jobs done" if not failed else f"[curve] done except {sorted(failed)}: re-run")
            raise SystemExit(1 if failed else 0)
        for job in pending:
            lock = out / "stages" / f"{job.name}.lock"
            if all(p.exists() for p in job.needs) and (fd := claim(lock)) is not None:
                try:
                    if (out / "stages" / f"{job.name}.done").exists():  # another lane finished it meanwhile
                        continue
                    if not run_job(out, job):
                        failed.add(job.name)
                finally:
                    release(lock, fd)
                break
        else:
            if not any(held(path) for path in (out / "stages").glob("*.lock")):  # no lane will make what's needed
                print(f"[curve] blocked: {pending[0].name} needs {[str(p) for p in pending[0].needs]}; failed "
                      f"{sorted(failed)}: fix and re-run", flush=True)
                raise SystemExit(1)
            time.sleep(15)  # waiting for another lane's checkpoint


def collect(out: Path, docs: Path) -> None:
    """Copy what the report reads (logs, results, stage times, the design) into docs/curve/logs: small, committed.
    Sample grids: seed 0's at the middle and the last fine-tuning step (equal steps across arms)."""
    dest = docs / "logs"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "design.json", dest / "design.json")
    for run_dir in sorted((out / "runs").iterdir()):
        if run_dir.is_file():  # probe-raw-pixels.json
            shutil.copy2(run_dir, dest / run_dir.name)
            continue
        for name in ("log.jsonl", "result.json", "config.yaml"):
            if (run_dir / name).exists():
                (dest / run_dir.name).mkdir(exist_ok=True)
                shutil.copy2(run_dir / name, dest / run_dir.name / name)
        if run_dir.name.endswith(f"-s{SEEDS[0]}"):
            for step in (FT_STEPS // 2, FT_STEPS):
                grid = run_dir / "samples" / f"step_{step:07d}.png"
                if grid.exists():
                    shutil.copy2(grid, dest / run_dir.name / grid.name)
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
    parser.add_argument("--setup-from", help="a finished default `usp demo --out DIR`: copy its VAE, latent cache, "
                        "domain classifier and FD reference instead of building them")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.command == "run":
        run(out, args.only, Path(args.setup_from).resolve() if args.setup_from else None)
    else:
        collect(out, Path(args.docs))
        subprocess.check_call([sys.executable, str(ROOT / "scripts" / "curve_report.py"), args.docs])


if __name__ == "__main__":
    main()
