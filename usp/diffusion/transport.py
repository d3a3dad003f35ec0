"""SiT's stochastic interpolants: paths, training objectives, and ODE / SDE samplers.

Time follows `docs/conventions.md` (transport time): t ∈ [0, 1], **t = 0 is noise, t = 1 is data**,

    x_t = α_t x1 + σ_t x0,   x1 data, x0 ~ N(0, I),   target velocity u_t = α̇_t x1 + σ̇_t x0,

and samplers integrate from t = 0 to t = 1. A path returns (α_t, σ_t, α̇_t, σ̇_t); everything else —
the loss, the conversions between velocity / score / noise, the ODE and SDE drifts — is derived from
those four numbers here, once. Equations cite SiT (Ma et al. 2024, arXiv 2401.08740) and stochastic
interpolants (Albergo et al. 2023, arXiv 2303.08797); numerics follow SiT's `transport` package.

With E[x1 | x_t] and E[x0 | x_t] the denoisers, for every path
    noise  ε(x, t) = E[x0 | x_t = x],            score s = ∇ log p_t(x) = −ε / σ_t,
    velocity v = α̇ E[x1|x] + σ̇ ε = (α̇/α) x + ((α̇/α) σ² − σ σ̇) s.          (SiT Eq. 8 with Eq. 5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchdiffeq import odeint

from usp.diffusion.gaussian import Generators, mean_flat, randn_like
from usp.diffusion.lightning import cosine_velocity_loss, shift_grid

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x: (N, C, H, W), t: (N,) float) -> (N, C, H, W)


def _expand(t: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcastable to x."""
    return t.view(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


class Path:
    """An interpolant x_t = α_t x1 + σ_t x0. Subclasses give `coefficients`; the rest is derived.

    Every method takes t broadcastable to x (use (N, 1, ..., 1) for batches) unless it says (N,).
    """

    name = "path"

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α_t, σ_t, α̇_t, σ̇_t), each of t's shape."""
        raise NotImplementedError

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """α̇_t / α_t, in a form that stays finite where the path allows it."""
        alpha, _, d_alpha, _ = self.coefficients(t)
        return d_alpha / alpha

    def drift_var(self, t: Tensor) -> Tensor:
        """(α̇/α) σ² − σ σ̇: the score coefficient of the velocity, and SiT's "SBDM" diffusion w_t."""
        _, sigma, _, d_sigma = self.coefficients(t)
        return self.d_log_alpha(t) * sigma**2 - sigma * d_sigma

    def interpolate(self, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """t: (N,), x0 noise, x1 data: (N, ...) -> (x_t, u_t) = (α x1 + σ x0, α̇ x1 + σ̇ x0)."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x1))
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def score_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """s = (r v − x) / (σ² − r σ̇ σ), r = α/α̇: the velocity identity solved for s; finite at t = 0. t: (N,)."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        r = alpha / d_alpha
        return (r * v - x) / (sigma**2 - r * d_sigma * sigma)

    def noise_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """ε = (r v − x) / (r σ̇ − σ), r = α/α̇. t: (N,)."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x))
        r = alpha / d_alpha
        return (r * v - x) / (r * d_sigma - sigma)

    def velocity_from_score(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """v = (α̇/α) x + drift_var · s (probability-flow drift, SiT's `compute_drift`). t: (N,)."""
        t = _expand(t, x)
        return self.d_log_alpha(t) * x + self.drift_var(t) * s


class LinearPath(Path):
    """α_t = t, σ_t = 1 − t (rectified flow / SiT "Linear")."""

    name = "linear"

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return 1 / t


class GVPPath(Path):
    """α_t = sin(πt/2), σ_t = cos(πt/2): variance preserving, α² + σ² = 1 (SiT "GVP")."""

    name = "gvp"

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        half_pi = math.pi / 2
        return torch.sin(half_pi * t), torch.cos(half_pi * t), half_pi * torch.cos(half_pi * t), \
            -half_pi * torch.sin(half_pi * t)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return math.pi / (2 * torch.tan(math.pi / 2 * t))


@dataclass(frozen=True)
class VPPath(Path):
    """The VP SDE of score-based models (Song et al. 2021) in interpolant time s = 1 − t (SiT's `VPCPlan`).

    β(s) = β_min + s (β_max − β_min); log α_t = −¼ (1−t)² (β_max − β_min) − ½ (1−t) β_min; σ_t = sqrt(1 − α_t²).
    α_0 = e^{−5.025} ≈ 0.0066, so t = 0 is noise only approximately; σ_1 = 0.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    name = "vp"

    def _log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * (1 - t) ** 2 * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min  # = β(1 − t) / 2

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        log_alpha, d_log_alpha = self._log_alpha(t), self.d_log_alpha(t)
        alpha, alpha_sq = torch.exp(log_alpha), torch.exp(2 * log_alpha)
        sigma = torch.sqrt(1 - alpha_sq)
        return alpha, sigma, alpha * d_log_alpha, -alpha_sq * d_log_alpha / sigma

    def drift_var(self, t: Tensor) -> Tensor:
        # (α̇/α)σ² − σσ̇ = (β/2)(σ² + α²) = β/2 exactly; SiT uses the closed form.
        return 0.5 * (self.beta_min + (1 - t) * (self.beta_max - self.beta_min))


PATHS: dict[str, Callable[[], Path]] = {"linear": LinearPath, "gvp": GVPPath, "vp": VPPath}
PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")


# --------------------------------------------------------------------------------------------
# Transport: objective and the model's drift
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transport:
    """A path, what the model predicts, how the loss is weighted, and the end-point guards.

    train_eps / sample_eps keep t away from the ends where a score or noise parametrisation is singular;
    `interval` says which end uses which (SiT's `check_interval`). Build with `create_transport`.
    """

    path: Path
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float = 0.0
    sample_eps: float = 0.0
    cosine_loss: bool = False  # LightningDiT: + mean over pixels of 1 − cos(v_θ, u_t) over channels (velocity only)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}, got {self.loss_weight!r}")
        if self.prediction == "velocity" and self.loss_weight is not None:
            # SiT silently ignores a weight for velocity prediction; say so instead.
            raise ValueError(f"loss_weight={self.loss_weight!r} applies to score/noise prediction only; "
                             "velocity prediction uses the plain MSE, so pass loss_weight=None")
        if self.cosine_loss and self.prediction != "velocity":
            raise ValueError("the cosine loss compares velocities (LightningDiT): it needs prediction='velocity'")

    def interval(self, *, sampling: bool = False, sde: bool = False, diffusion_form: str = "sigma",
                 last_step_size: float = 0.0) -> tuple[float, float]:
        """[t0, t1] for training (sampling=False, uses train_eps) or sampling (sample_eps), as SiT.

        VP: t1 = 1 − eps (σ_1 = 0). Linear/GVP with velocity and the ODE: [0, 1], no guard needed.
        Otherwise t0 = eps where the SBDM diffusion or a score/noise model blows up at t = 0, and t1 = 1 − eps.
        An SDE with a last step stops at t1 = 1 − last_step_size and leaves the rest to the last step.
        """
        eps = self.sample_eps if sampling else self.train_eps
        t0, t1 = 0.0, 1.0
        end = 1 - last_step_size if sde and last_step_size > 0 else 1 - eps
        if isinstance(self.path, VPPath):
            t1 = end
        elif self.prediction != "velocity" or sde:
            t0 = eps if (sde and diffusion_form == "SBDM") or self.prediction != "velocity" else 0.0
            t1 = end
        return t0, t1

    def training_losses(self, model_fn: ModelFn, x1: Tensor, noise: Tensor | None = None,
                        t: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample loss (N,) for data x1: (N, C, H, W); t ~ U[t0, t1] and x0 ~ N(0, I) unless given.

        velocity: ‖v_θ − u_t‖² (SiT Eq. 6). noise: λ ‖ε_θ − x0‖². score: λ ‖σ_t s_θ + x0‖² (SiT Eq. 7),
        λ = 1 ("none"), (w_t/σ_t)² ("velocity"), w_t/σ_t² ("likelihood"), w_t = drift_var (SiT §2.2).
        """
        if t is None:
            t0, t1 = self.interval()
            t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype) * (t1 - t0) + t0
        x0 = torch.randn_like(x1) if noise is None else noise
        x_t, u_t = self.path.interpolate(t, x0, x1)
        out = model_fn(x_t, t)
        if out.shape != x1.shape:
            raise ValueError(f"model output {tuple(out.shape)} must match the data {tuple(x1.shape)}")
        if self.prediction == "velocity":
            mse = mean_flat((out - u_t) ** 2)
            if not self.cosine_loss:
                return {"loss": mse}
            cos = cosine_velocity_loss(out, u_t)  # LightningDiT's train.py: loss = mse + cos_loss, both logged
            return {"loss": mse + cos, "mse": mse, "cos_loss": cos}
        te = _expand(t, x1)
        sigma, w = self.path.coefficients(te)[1], self.path.drift_var(te)
        weight = {None: torch.ones_like(te), "velocity": (w / sigma) ** 2, "likelihood": w / sigma**2}[self.loss_weight]
        err = out - x0 if self.prediction == "noise" else out * sigma + x0
        return {"loss": mean_flat(weight * err**2)}

    def velocity(self, model_fn: ModelFn, x: Tensor, t: Tensor) -> Tensor:
        """The probability-flow ODE drift v(x, t) from one model call. x: (N, ...), t: (N,)."""
        out = model_fn(x, t)
        if self.prediction == "velocity":
            return out
        score = out if self.prediction == "score" else -out / self.path.coefficients(_expand(t, x))[1]
        return self.path.velocity_from_score(score, x, t)

    def velocity_and_score(self, model_fn: ModelFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(v, s) at (x, t) from one model call. x: (N, ...), t: (N,)."""
        out = model_fn(x, t)
        if self.prediction == "velocity":
            return out, self.path.score_from_velocity(out, x, t)
        score = out if self.prediction == "score" else -out / self.path.coefficients(_expand(t, x))[1]
        return self.path.velocity_from_score(score, x, t), score


def create_transport(path: str = "linear", prediction: str = "velocity", loss_weight: str | None = None,
                     train_eps: float | None = None, sample_eps: float | None = None,
                     cosine_loss: bool = False) -> Transport:
    """SiT's transport. path: 'linear' | 'gvp' | 'vp' (any case); prediction: 'velocity' | 'score' | 'noise'.

    Default eps (SiT's `create_transport`): VP 1e-5 train / 1e-3 sample; Linear/GVP with score or noise
    1e-3 / 1e-3; Linear/GVP with velocity 0 / 0. Each eps left as None gets its own default (SiT tests
    train_eps for both, and ignores given eps for velocity; here a given value is used).
    """
    key = path.lower()
    if key not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {path!r}")
    loss_weight = None if loss_weight in (None, "none", "None") else loss_weight
    if key == "vp":
        defaults = (1e-5, 1e-3)
    elif prediction != "velocity":
        defaults = (1e-3, 1e-3)
    else:
        defaults = (0.0, 0.0)
    return Transport(path=PATHS[key](), prediction=prediction, loss_weight=loss_weight,
                     train_eps=defaults[0] if train_eps is None else float(train_eps),
                     sample_eps=defaults[1] if sample_eps is None else float(sample_eps), cosine_loss=cosine_loss)


# --------------------------------------------------------------------------------------------
# Samplers (pure functions of a transport, a model and the starting noise x0 at t = 0)
# --------------------------------------------------------------------------------------------


# The ODE solvers that walk a fixed grid (sample_ode's own loop); any other name is an adaptive torchdiffeq method.
FIXED_GRID_METHODS = ("euler", "heun")


@torch.no_grad()
def sample_ode(transport: Transport, model_fn: ModelFn, x0: Tensor, *, method: str = "dopri5", num_steps: int = 50,
               atol: float = 1e-6, rtol: float = 1e-3, timestep_shift: float = 0.0) -> tuple[Tensor, int]:
    """Integrate dx/dt = v(x, t) from t0 to t1 (SiT Eq. 3); returns (x at t1, number of model calls).

    method: 'euler' or 'heun' (fixed grid of `num_steps` points, i.e. num_steps − 1 steps, as SiT's grid),
    or any adaptive torchdiffeq method ('dopri5', 'bosh3', …) with tolerances atol / rtol.
    timestep_shift s > 0: the fixed grid mapped by t -> s·t / (1 + (s − 1)·t) (LightningDiT; usp.diffusion.lightning).
    x0: (N, C, H, W) Gaussian noise.
    """
    t0, t1 = transport.interval(sampling=True)
    nfe = 0

    def drift(t: Tensor, x: Tensor) -> Tensor:  # t: () -> (N,) for the model
        nonlocal nfe
        nfe += 1
        return transport.velocity(model_fn, x, t.expand(x.shape[0]).to(x.dtype)).to(x.dtype)

    method = method.lower()
    if method in FIXED_GRID_METHODS:
        if num_steps < 2:
            raise ValueError(f"num_steps counts grid points and must be at least 2, got {num_steps}")
        ts = shift_grid(torch.linspace(t0, t1, num_steps, device=x0.device, dtype=x0.dtype), timestep_shift)
        x = x0
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t_cur
            k1 = drift(t_cur, x)
            if method == "euler":
                x = x + dt * k1
            else:  # Heun: trapezoid of the slopes at both ends of the Euler step
                k2 = drift(t_next, x + dt * k1)
                x = x + 0.5 * dt * (k1 + k2)
        return x, nfe
    ts = torch.tensor([t0, t1], device=x0.device, dtype=x0.dtype)
    return odeint(drift, x0, ts, method=method, atol=atol, rtol=rtol)[-1], nfe


def diffusion_coefficient(path: Path, t: Tensor, form: str = "sigma", norm: float = 1.0) -> Tensor:
    """w_t of the SDE dx = [v + w_t s] dt + sqrt(2 w_t) dW (SiT Eq. 9). t broadcastable, same shape out."""
    forms: dict[str, Callable[[], Tensor]] = {
        "constant": lambda: torch.full_like(t, norm),
        "SBDM": lambda: norm * path.drift_var(t),  # matches the score-based VP/VE diffusion
        "sigma": lambda: norm * path.coefficients(t)[1],
        "linear": lambda: norm * (1 - t),
        "decreasing": lambda: 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
        "increasing-decreasing": lambda: norm * torch.sin(math.pi * t) ** 2,  # SiT misspells this key and raises
    }
    if form not in forms:
        raise ValueError(f"diffusion form must be one of {list(forms)}, got {form!r}")
    return forms[form]()


LAST_STEPS = (None, "mean", "tweedie", "euler")


@torch.no_grad()
def sample_sde(transport: Transport, model_fn: ModelFn, x0: Tensor, *, method: str = "euler",
               diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: str | None = "Mean",
               last_step_size: float = 0.04, num_steps: int = 250,
               generator: Generators = None) -> tuple[Tensor, int]:
    """Integrate dx = [v + w_t s] dt + sqrt(2 w_t) dW from t0 to t1, then one last step; returns (x, model calls).

    method: 'euler' (Euler–Maruyama) or 'heun' (noise, then a Heun step on the drift), on SiT's grid
    linspace(t0, t1, num_steps) (num_steps − 1 steps). The last step from t1 = 1 − last_step_size:
    'Mean' (drift only, no noise), 'Tweedie' (E[x1 | x_t1] = (x + σ² s) / α), 'Euler' (ODE step), or None.
    diffusion_form: see `diffusion_coefficient` ('sigma' is SiT's sampling default; 'SBDM' needs t0 > 0).
    """
    method = method.lower()
    if method not in ("euler", "heun"):
        raise ValueError(f"SDE method must be 'euler' or 'heun', got {method!r}")
    last = last_step.lower() if isinstance(last_step, str) else last_step
    if last not in LAST_STEPS:
        raise ValueError(f"last_step must be one of 'Mean', 'Tweedie', 'Euler' or None, got {last_step!r}")
    last_step_size = 0.0 if last is None else last_step_size
    path = transport.path
    t0, t1 = transport.interval(sampling=True, sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    if diffusion_form == "SBDM" and t0 == 0 and not isinstance(path, VPPath):
        raise ValueError(f"the SBDM diffusion of the {path.name} path is infinite at t = 0; "
                         "build the transport with sample_eps > 0 (e.g. 1e-3) or use diffusion_form='sigma'")
    if num_steps < 2:
        raise ValueError(f"num_steps counts grid points and must be at least 2, got {num_steps}")
    nfe = 0

    def drift(x: Tensor, t: Tensor) -> Tensor:  # t: (N,)
        nonlocal nfe
        nfe += 1
        v, s = transport.velocity_and_score(model_fn, x, t)
        return v + diffusion_coefficient(path, _expand(t, x), diffusion_form, diffusion_norm) * s

    ts = torch.linspace(t0, t1, num_steps, device=x0.device, dtype=x0.dtype)
    dt = ts[1] - ts[0]
    x = x0
    for t_cur in ts[:-1]:
        t = t_cur.expand(x.shape[0])
        dw = randn_like(x, generator) * torch.sqrt(dt)
        w = diffusion_coefficient(path, _expand(t, x), diffusion_form, diffusion_norm)
        if method == "euler":
            x = x + drift(x, t) * dt + torch.sqrt(2 * w) * dw
        else:
            x = x + torch.sqrt(2 * w) * dw
            k1 = drift(x, t)
            k2 = drift(x + dt * k1, t + dt)
            x = x + 0.5 * dt * (k1 + k2)

    t = torch.full((x.shape[0],), t1, device=x.device, dtype=x.dtype)
    if last == "mean":
        x = x + drift(x, t) * last_step_size
    elif last == "euler":
        nfe += 1
        x = x + transport.velocity(model_fn, x, t) * last_step_size
    elif last == "tweedie":
        nfe += 1
        alpha, sigma = path.coefficients(_expand(t, x))[:2]
        x = (x + sigma**2 * transport.velocity_and_score(model_fn, x, t)[1]) / alpha
    return x, nfe
