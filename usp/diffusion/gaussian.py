"""DDPM as DiT trains and samples it: linear schedule, learned-range variance, hybrid loss, respacing.

Time follows `docs/conventions.md` (DDPM time): integer t ∈ {0, …, T−1}, t = 0 is (almost) data.
A respaced diffusion runs on its own indices k ∈ {0, …, K−1} but always hands the model the
*original* timestep `timestep_map[k]`, so one network serves every respacing.

Equations cited: Ho et al. 2020 ("DDPM", arXiv 2006.11239), Nichol & Dhariwal 2021 ("IDDPM",
arXiv 2102.09672), Song et al. 2021 ("DDIM", arXiv 2010.02502). Schedules are built in float64 and
looked up as float32, as DiT does; the float32 tables are placed on each device once (`to`, or the first look-up
there), so a training or sampling step copies nothing from the host (DiT copies a float64 array per look-up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x: (N, C, H, W), t: (N,) long) -> (N, C or 2C, H, W)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """β_t linear from 1e-4 to 0.02 (DDPM §4), scaled by 1000/T for other T (IDDPM §3.2). (T,) float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Original timesteps kept by a respacing (IDDPM §4, ADM's rule).

    "250" or "10,20" splits [0, T) into equal sections and takes evenly strided steps from each;
    "ddimN" takes the integer stride of the DDIM paper that yields exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"no integer stride takes exactly {want} of {num_timesteps} steps (respacing "
                             f"'{section_counts}'); use a plain count such as '{want}'")
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing section {i} has {size} steps, cannot take {count} from it")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0  # accumulated, not multiplied, so rounding matches ADM bit for bit
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


# --------------------------------------------------------------------------------------------
# Gaussian log-densities (in nats)
# --------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    # tanh approximation of Φ (Page 1977), the one DDPM/IDDPM/DiT use.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of N(means, e^{2 log_scales}) integrated over 8-bit bins of [-1, 1] (DDPM §3.3), in nats.

    The bins at ±1 extend to ±∞. x, means, log_scales: same shape; returns that shape.
    """
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: Tensor) -> Tensor:
    """(N, ...) -> (N,) mean over all but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------
# The diffusion
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A DDPM with ε-prediction over the schedule `betas`; `create_diffusion` is the way to build one.

    learn_sigma=True: the model returns 2C channels [ε, v], v ∈ [-1, 1] interpolating log β_t and
    log β̃_t (IDDPM Eq. 15), trained by the hybrid loss L_simple + L_vlb (IDDPM Eq. 16).
    learn_sigma=False: fixed variance σ_t² = β_t ("fixed large", DiT's choice), loss L_simple only.
    timestep_map[k] is the original timestep the model is given at index k (identity if None).
    rescale_vb: multiply L_vlb by K/1000 (DiT's `rescale_learned_sigmas`; off by default, as in DiT).
    """

    def __init__(self, betas: np.ndarray, *, learn_sigma: bool = True, timestep_map: Sequence[int] | None = None,
                 rescale_vb: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be 1-D, at least 2 long, in (0, 1]; got shape {betas.shape}")
        self.num_timesteps = len(betas)
        self.learn_sigma, self.rescale_vb = learn_sigma, rescale_vb
        timestep_map = list(range(len(betas))) if timestep_map is None else list(timestep_map)
        if len(timestep_map) != len(betas):
            raise ValueError(f"timestep_map has {len(timestep_map)} entries for {len(betas)} betas")
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.long)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)  # ᾱ_t
        ac_prev = np.append(1.0, ac[:-1])  # ᾱ_{t-1}, with ᾱ_{-1} = 1
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # β̃_t (DDPM Eq. 7)
        arrays = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_variance": post_var,
            # β̃_0 = 0, so its log is clipped to log β̃_1 (IDDPM)
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),  # μ̃_t coefficient of x_0 (DDPM Eq. 7)
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),  # ... and of x_t
            "log_betas": np.log(betas),
            # "fixed large" variance β_t, with β̃_1 at t = 0 for a better decoder likelihood (IDDPM)
            "fixed_variance": np.append(post_var[1], betas[1:]),
        }
        arrays["fixed_log_variance"] = np.log(arrays["fixed_variance"])
        self._arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}  # (T,) float64 each, on the host
        self._tables: dict[torch.device, dict[str, Tensor]] = {}  # float32 copies (and the map) per device

    def schedule(self, name: str) -> Tensor:
        """One of the float64 (T,) schedule arrays, e.g. 'alphas_cumprod', 'posterior_variance'."""
        return self._arrays[name]

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Put the float32 schedules and the timestep map on `device` now (else the first look-up there does)."""
        self._on(torch.device(device))
        return self

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        if device.type == "cuda" and device.index is None:  # t.device always carries an index
            device = torch.device("cuda", torch.cuda.current_device())
        tables = self._tables.get(device)
        if tables is None:
            # Casting before indexing gives the values DiT's index-then-cast gives: the cast is elementwise.
            tables = {k: v.float().to(device) for k, v in self._arrays.items()}
            tables["timestep_map"] = self.timestep_map.to(device)
            self._tables[device] = tables
        return tables

    def _at(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """Schedule `name` at t: (N,) -> (N, 1, ..., 1) float32 on t's device, broadcastable to x."""
        return self._on(t.device)[name][t].view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Respaced indices (N,) -> the original timesteps (N,) the model is trained on."""
        return self._on(t.device)["timestep_map"][t]

    # ---- forward process ------------------------------------------------------------------

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε (DDPM Eq. 4). x_start, noise: (N, ...); t: (N,)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return self._at("sqrt_alphas_cumprod", t, x_start) * x_start + \
            self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t) (DDPM Eqs. 6-7): (mean, variance, clipped log variance)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x_start + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t), Eq. 4 solved for x_0."""
        return self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - \
            self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) / \
            self._at("sqrt_recipm1_alphas_cumprod", t, x_t)

    # ---- reverse process ------------------------------------------------------------------

    def p_from_output(self, output: Tensor, x: Tensor, t: Tensor, clip_denoised: bool = False) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a raw model output (N, C or 2C, ...).

        Returns mean, variance, log_variance, pred_xstart and eps, each like x: (N, C, ...).
        """
        channels = x.shape[1]
        if self.learn_sigma:
            if output.shape != (x.shape[0], 2 * channels, *x.shape[2:]):
                raise ValueError(f"learn_sigma needs a model output of {2 * channels} channels, "
                                 f"got {tuple(output.shape)}")
            eps, v = output.split(channels, dim=1)
            frac = (v + 1) / 2  # v ∈ [-1, 1] → [0, 1] (IDDPM Eq. 15)
            log_var = frac * self._at("log_betas", t, x) + (1 - frac) * self._at("posterior_log_variance_clipped", t, x)
            var = torch.exp(log_var)
        else:
            if output.shape != x.shape:
                raise ValueError(f"model output {tuple(output.shape)} must match x {tuple(x.shape)}")
            eps = output
            var = self._at("fixed_variance", t, x).expand_as(x)
            log_var = self._at("fixed_log_variance", t, x).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, x, t)  # μ_θ = μ̃_t(x_t, x̂_0) (DDPM Eq. 11)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model_fn: ModelFn, x: Tensor, t: Tensor,
                        clip_denoised: bool = False) -> dict[str, Tensor]:
        """Run the model at respaced index t (it sees the original timestep) and return `p_from_output`."""
        return self.p_from_output(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)

    # ---- training -------------------------------------------------------------------------

    def vb_terms_bpd(self, x_start: Tensor, x_t: Tensor, t: Tensor, p: dict[str, Tensor]) -> Tensor:
        """L_vlb term in bits per dim, (N,) (DDPM Eq. 5).

        −log p(x_0 | x_1) (discretized decoder) at t = 0, else KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)).
        """
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, model_fn: ModelFn, x_start: Tensor, t: Tensor,
                        noise: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample losses (N,) at respaced indices t (N,): loss = mse [+ vb]; x_start: (N, C, H, W).

        mse = ‖ε − ε_θ‖² averaged over dims (L_simple, DDPM Eq. 14). With learn_sigma the VB term sees the
        mean through a stop-gradient, so it trains only the variance (IDDPM §3.1, "frozen_out" in DiT).
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        output = model_fn(x_t, self.model_timesteps(t))
        terms: dict[str, Tensor] = {}
        if self.learn_sigma:
            eps, v = output.split(x_start.shape[1], dim=1)
            frozen = torch.cat([eps.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(x_start, x_t, t, self.p_from_output(frozen, x_t, t))
            if self.rescale_vb:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            eps = output
        if eps.shape != noise.shape:
            raise ValueError(f"model ε of shape {tuple(eps.shape)} must match x_start {tuple(x_start.shape)}")
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


# --------------------------------------------------------------------------------------------
# Samplers (pure functions of a diffusion, a model and the starting noise)
# --------------------------------------------------------------------------------------------


def _reverse_indices(num_timesteps: int, progress: bool) -> Iterable[int]:
    indices = range(num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices)
    return indices


Generators = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like x, drawn on x's device. A sequence of generators (one per sample, on x's
    device) makes each sample's noise depend on its own seed only, so a sample set does not depend on the batch
    size or the number of processes; drawing on the device keeps the host out of every step."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    for g in generator:
        if g.device.type != x.device.type:  # else every step would draw on the host and copy
            raise ValueError(f"a generator on {g.device} for a batch on {x.device}: make the per-sample generators "
                             f"on the batch's device, torch.Generator(device={str(x.device)!r}).manual_seed(seed)")
    # float32 draws cast to x's dtype, as before: the same numbers for a seed whatever the sampling precision
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in generator]).to(x.dtype)


@torch.no_grad()
def p_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: Tensor, *, clip_denoised: bool = False,
                  progress: bool = False, generator: Generators = None) -> Tensor:
    """Ancestral DDPM sampling (DDPM Alg. 2): x_{t-1} = μ_θ + σ_θ z, no noise at t = 0.

    noise: (N, C, H, W) x_T; returns x_0 of that shape. DiT samples with clip_denoised=False (latents).
    """
    x = noise
    for i in _reverse_indices(diffusion.num_timesteps, progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model_fn, x, t, clip_denoised)
        if i > 0:
            x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * randn_like(x, generator)
        else:  # no noise at the last step (DDPM Alg. 2)
            x = p["mean"]
    return x


@torch.no_grad()
def ddim_sample_loop(diffusion: GaussianDiffusion, model_fn: ModelFn, noise: Tensor, *, eta: float = 0.0,
                     clip_denoised: bool = False, progress: bool = False,
                     generator: Generators = None) -> Tensor:
    """DDIM sampling (DDIM Eq. 12); eta=0 is deterministic, eta=1 has DDPM's posterior variance.

    noise: (N, C, H, W) x_T; returns x_0. A learned variance output, if any, is ignored.
    """
    x = noise
    for i in _reverse_indices(diffusion.num_timesteps, progress):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = diffusion.p_mean_variance(model_fn, x, t, clip_denoised)
        eps = diffusion.predict_eps_from_xstart(x, t, p["pred_xstart"])  # re-derived: differs only if clipped
        ac, ac_prev = diffusion._at("alphas_cumprod", t, x), diffusion._at("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)  # DDIM Eq. 16
        x = p["pred_xstart"] * torch.sqrt(ac_prev) + torch.sqrt(1 - ac_prev - sigma**2) * eps
        if i > 0 and eta > 0:
            x = x + sigma * randn_like(x, generator)
    return x


def create_diffusion(timestep_respacing: str | None = None, learn_sigma: bool = True, num_timesteps: int = 1000,
                     *, rescale_vb: bool = False) -> GaussianDiffusion:
    """The DDPM of DiT: linear betas over `num_timesteps`, keeping the steps `timestep_respacing` names.

    timestep_respacing: None or "" keeps all steps (training); "250", "ddim50", "10,20" for sampling.
    The kept steps τ_0 < … < τ_{K-1} get betas β'_k = 1 − ᾱ_{τ_k} / ᾱ_{τ_{k-1}} (ᾱ_{τ_{-1}} = 1) so that
    the respaced ᾱ'_k equal the original ᾱ_{τ_k} (IDDPM §4).
    """
    base_ac = np.cumprod(1.0 - linear_betas(num_timesteps))
    kept = sorted(space_timesteps(num_timesteps, timestep_respacing or str(num_timesteps)))
    kept_ac = base_ac[kept]
    betas = 1.0 - kept_ac / np.append(1.0, kept_ac[:-1])
    return GaussianDiffusion(betas, learn_sigma=learn_sigma, timestep_map=kept, rescale_vb=rescale_vb)
