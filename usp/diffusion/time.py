"""The time a transport network was trained in: SiT's (usp's own) or REPA's.

SiT time (docs/conventions.md): t = 0 is noise, t = 1 is data, x_t = t·x1 + (1 − t)·x0 on the linear path, and the
network predicts the velocity dx_t/dt = x1 − x0. REPA (sihyun-yu/REPA loss.py, samplers.py) runs the same path
backwards: s = 0 is data, s = 1 is noise, x_s = (1 − s)·x1 + s·x0, velocity dx_s/ds = x0 − x1. With s = 1 − t the
two describe one process, and a REPA network f answers SiT's question as

    v_sit(x, t) = −f(x, 1 − t).

`generation.time: repa` wraps the network that way, for training and sampling alike, so a REPA checkpoint samples
with usp's samplers (and a usp run trained in REPA time writes checkpoints REPA's samplers read). The loss is the
same number: ‖−f − u_sit‖² = ‖f − u_repa‖², and so is the cosine term. Guidance intervals stay in the noise level
1 − t, which is REPA's s itself.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

TIMES = ("sit", "repa")


def in_sit_time(net: Callable[..., Tensor], time: str) -> Callable[..., Tensor]:
    """net(x, t, *args) in `time` -> the same call in SiT time: net itself, or −net(x, 1 − t, *args) for REPA's."""
    if time not in TIMES:
        raise ValueError(f"generation.time must be one of {', '.join(TIMES)}, got {time!r}")
    if time == "sit":
        return net

    def sit_time(x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        return -net(x, 1 - t, *args, **kwargs)

    return sit_time
