"""The peak-memory estimate printed at the start of a run (usp.train.memory) against two measured peaks of the
same run, each in a fresh process: the most bytes its CPU tensors held at once (`tensor_peak`: the allocator's
own count, what the estimate predicts; tests/test_memory.py asserts it) and its resident-set growth (what the
kernel sees: adds the C library's retained free memory, the interpreter's and libraries' own allocations).

    python benchmarks/bench_memory_estimate.py --repeats 3

Each run is a subprocess, and its RSS peak is read from /proc/self/status VmHWM after resetting it
(/proc/self/clear_refs 5) rather than from getrusage's ru_maxrss: Linux carries a parent's ru_maxrss into a child
across fork and exec, so a child of a pytest process that once held 3 GB starts with ru_maxrss 3 GB, and its
growth above that start reads near 0 (the 0.49x this check measured inside the full suite in session 6).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One run in a fresh process: the estimate the engine prints, and the peak of the chosen measure above what the
# process held before the task was built. "tensors": the live-tensor peak; "rss": the resident-set peak.
_MEASURE = textwrap.dedent("""
    import contextlib, json, sys
    import usp.train.engine as engine
    from usp.config import load_config
    from usp.train.memory import tensor_peak
    from usp.train.tasks import build_task

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    @contextlib.contextmanager
    def rss_peak():
        measured = {}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        base = status("VmRSS")
        yield measured
        measured["peak"] = status("VmHWM") - base

    estimates = []
    original = engine.estimate_run
    engine.estimate_run = lambda *a, **k: estimates.append(original(*a, **k)) or estimates[-1]
    measure, config = sys.argv[1], load_config(None, sys.argv[2:])
    with (tensor_peak() if measure == "tensors" else rss_peak()) as measured:
        engine.train(config, build_task(config), engine.setup_runtime("cpu"), resume=None)
    print(json.dumps({"estimate": estimates[0].total, "parts": estimates[0].parts, "measured": measured["peak"]}))
""")


def run_overrides(vae: Path, out_dir: Path, model: str = "vit_s_2", batch: int = 64) -> list[str]:
    """A full fine-tune of `model` on 64 px Fashion-MNIST through the tiny f4 VAE: 2 steps at `batch` on `batch`
    images (the end-of-run evaluation reads as many: more would add time, not memory), fp32. Activations dominate
    (ViT-S/2 at batch 64: 1.23 GB of the 1.57 GB estimate)."""
    return ["run.task=classify", f"model.name={model}", "model.num_classes=10", "data.source=fashion_mnist",
            "data.image_size=64", f"data.limit={batch}", "data.num_workers=0", "latent.space=small-f4",
            f"latent.path={vae}", f"run.out_dir={out_dir}", "train.max_steps=2", f"train.global_batch={batch}",
            "train.amp=fp32", "train.tensorboard=false", "train.progress=false"]


def measure(overrides: list[str], what: str = "tensors") -> dict:
    """{"estimate", "parts", "measured"} (bytes) of one run of `overrides` in a fresh process; what: "tensors"
    (the live-tensor peak) or "rss" (the resident-set growth; Linux)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, what, *overrides], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"the measured run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_vae(folder: Path) -> Path:
    """A random f4 AutoencoderKL with narrow blocks (the tests' tiny VAE), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL

    from usp.latent.vae import F4_AUTOENCODER_CONFIG, STATS_FILE

    torch.manual_seed(0)
    folder = folder / "small-f4"
    AutoencoderKL(**{**F4_AUTOENCODER_CONFIG, "block_out_channels": [8, 8, 8], "norm_num_groups": 4}
                  ).save_pretrained(str(folder))
    (folder / STATS_FILE).write_text(json.dumps({"scale": 2.0, "shift": 0.1}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="vit_s_2")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vae = tiny_vae(Path(tmp))
        print(f"| run | {args.model}, batch {args.batch}: estimate GB | tensor peak GB | / estimate | "
              "RSS peak GB | / estimate |")
        print("| --- | --- | --- | --- | --- | --- |")
        for run in range(args.repeats):
            tensors = measure(run_overrides(vae, Path(tmp) / f"t{run}", args.model, args.batch), "tensors")
            rss = measure(run_overrides(vae, Path(tmp) / f"r{run}", args.model, args.batch), "rss")
            estimate = tensors["estimate"]
            print(f"| {run} | {estimate / 1e9:.3f} | {tensors['measured'] / 1e9:.3f} | "
                  f"{tensors['measured'] / estimate:.3f} | {rss['measured'] / 1e9:.3f} | "
                  f"{rss['measured'] / estimate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
