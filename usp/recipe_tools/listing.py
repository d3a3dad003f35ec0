"""`usp list [models | latent-spaces | recipes]`: what a recipe may name, one line each, from the tables
themselves (the model registry, LATENT_SPACES, the shipped recipes' first comment line)."""

from __future__ import annotations

from usp.config import recipes_dir


def models() -> list[str]:
    from usp.models import REGISTRY

    # Which sizes the paper uses: USP pretrains ViT-B/L/XL and fine-tunes DiT/SiT-B/L/XL; t is the CPU demo's.
    # A size without a note is listed all the same (every registered name is a valid recipe choice).
    setting = {"t": "CPU demo / tests", "b": "paper", "l": "paper", "xl": "paper"}
    width = max(map(len, REGISTRY))
    return [f"{name:<{width}}  {entry.description}" + (f"; {setting[entry.size]}" if entry.size in setting else "")
            for name, entry in REGISTRY.items()]


def latent_spaces() -> list[str]:
    from usp.latent.vae import LATENT_SPACES

    width = max(map(len, LATENT_SPACES))
    lines = []
    for name, spec in LATENT_SPACES.items():
        norm = {"constant": f"scale {spec.scale}, shift {spec.shift}",
                "usp_stats": "scale and shift from the VAE folder (usp train-vae)",
                "channel_stats": f"per-channel (x - mean) / std x {spec.scale}, stats from {spec.stats_file} "
                                 "beside the checkpoint",
                "vae_config": "scale/shift (or per-channel mean/std) from the VAE's config.json"}[spec.norm]
        where = spec.default_path or ("latent.path: an LDM checkpoint" if spec.kind == "ldm" else
                                      "latent.path: a folder")
        lines.append(f"{name:<{width}}  {spec.channels} channels, factor {spec.factor} "
                     f"(256 px -> {256 // spec.factor}²), {norm}; {where}")
    return lines


def recipes() -> list[str]:
    root = recipes_dir()
    lines = []
    for path in sorted(root.rglob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        lines.append(f"{path.relative_to(root).with_suffix('').as_posix():<32}  {first}")
    return lines


def listing(what: str = "all") -> str:
    """The text `usp list WHAT` prints: one kind is one line per entry (`usp list models | wc -l` counts the
    registry); `all` is every kind under its heading."""
    parts = {"models": models, "latent-spaces": latent_spaces, "recipes": recipes}
    if what != "all":
        lines = parts[what]()
        if what == "recipes":
            lines.append(f"(recipes: {recipes_dir()}; run one by name, e.g. `usp pretrain fmnist/pretrain`)")
        return "\n".join(lines)
    blocks = [f"{name}:\n" + "\n".join(f"  {line}" for line in fn()) for name, fn in parts.items()]
    blocks.append(f"(recipes: {recipes_dir()}; run one by name, e.g. `usp pretrain fmnist/pretrain`)")
    return "\n\n".join(blocks)


def list_command(what: str = "all") -> None:
    """`usp list [WHAT]`: prints `listing`."""
    print(listing(what))
