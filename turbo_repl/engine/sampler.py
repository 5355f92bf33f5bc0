"""The rCM few-step sampler, as TurboDiffusion's inference scripts run it.

The schedule is a handful of TrigFlow angles, turned into rectified-flow times t = sin a / (cos a + sin a). The
network predicts the flow velocity v, so x0 = x_t - t * v. SDE steps re-noise the predicted x0 to the next time
with fresh noise (drawn on every step, the last included, so the generator stream matches the reference); ODE
steps are plain Euler steps. x is kept in float64 between steps and handed to the network in its dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# Angles between the first (atan(sigma_max)) and the last (0), for 2, 3 and 4 steps: the rCM checkpoints'
# training schedule.
MID_ANGLES = (1.5, 1.4, 1.0)
MAX_STEPS = len(MID_ANGLES) + 1

# velocity(x_in, timesteps, step) -> v ; x_in in the network dtype, timesteps [B, 1] = t * 1000 in that dtype
Velocity = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def rf_times(steps: int, sigma_max: float) -> torch.Tensor:
    """Rectified-flow times t_0 > ... > t_steps = 0 as float64 (steps + 1 values)."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, not {steps}")
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0, not {sigma_max}")
    angles = torch.tensor([math.atan(sigma_max), *MID_ANGLES[: steps - 1], 0.0], dtype=torch.float64)
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def network_timesteps(t: torch.Tensor, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """t * 1000 as the network receives it: [B, 1] in the network dtype (bf16 rounds 987.65 to 988)."""
    return (t.float() * torch.ones(batch, 1, device=device) * 1000).to(dtype)


def expert_steps(times: torch.Tensor, boundary: float) -> list[int]:
    """Expert index per step for a two-expert (Wan2.2 I2V) model: 0 = high noise while t >= boundary, then 1
    (low noise) from the first step below it on; the switch happens once."""
    experts, switched = [], False
    for t in times[:-1].tolist():
        switched = switched or t < boundary
        experts.append(1 if switched else 0)
    return experts


def initial_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float32, generator=generator, device=device)


def sample(
    velocity: Velocity,
    noise: torch.Tensor,
    *,
    steps: int,
    sigma_max: float,
    ode: bool,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
    step_noise: Callable[[int], torch.Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from `noise` (float32, [N, 16, T, H, W]) and return the final latent in float32.

    SDE steps draw their noise from `generator` (the one that drew `noise`), or take it from `step_noise(i)`
    when given (parity tests feed the reference's stored draws). `on_step(done, total)` runs after each step;
    it may raise to cancel.
    """
    times = rf_times(steps, sigma_max)
    x = noise.double() * times[0]
    for i in range(steps):
        t_cur, t_next = times[i], times[i + 1]
        v = velocity(x.to(dtype), network_timesteps(t_cur, x.shape[0], dtype, x.device), i).double()
        if ode:
            x = x - (t_cur - t_next) * v
        else:
            eps = step_noise(i) if step_noise is not None else torch.randn(
                x.shape, dtype=torch.float32, generator=generator, device=x.device)
            # t_next * eps stays a float32 product (0-dim float64 times float32), only the sum is float64,
            # exactly as in the reference.
            x = (1 - t_next) * (x - t_cur * v) + t_next * eps
        if on_step is not None:
            on_step(i + 1, steps)
    return x.float()
