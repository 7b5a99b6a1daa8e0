"""Noise schedules (training) and samplers (generation), all diffusers schedulers.

Training uses DDPM's forward process with a linear (β 1e-4 → 0.02, Ho et al. 2020)
or cosine (Nichol & Dhariwal 2021, ``squaredcos_cap_v2``) schedule. Samplers are built
from the training scheduler's config so they share its β's:

- ``ddpm``: ancestral sampling (Ho et al. 2020), strided when ``steps`` < T.
- ``ddim``: deterministic DDIM (η = 0), ``trailing`` timestep spacing so the first
  step starts at t = T-1 (better at few steps), x̂0 clipped to [-1, 1].
- ``dpm``: DPM-Solver++ (2M), with x̂0 clipped to the data range (``thresholding`` with
  ``sample_max_value = 1``, i.e. a plain clip, as DDPM/DDIM do by default) and trailing
  spacing. A trial on an earlier small model found unclipped DPM-Solver far worse; on the
  demo model of bench/results/sampling/sampling.json the clip made no measurable difference.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from fedsynth.config import DiffusionConfig
from fedsynth.core.errors import ConfigError

# diffusion.schedule → (diffusers' beta_schedule, β_1, β_T); scaled_linear is Stable Diffusion's
BETA_SCHEDULES = {
    "linear": ("linear", 1e-4, 0.02),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
}


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    schedule, beta_start, beta_end = BETA_SCHEDULES[cfg.schedule]
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type="epsilon",
        clip_sample=cfg.clip_sample,
        clip_sample_range=1.0,
    )


def check_base_schedule(cfg: DiffusionConfig, base: dict, where: str) -> None:
    """A base model (a pipeline's ``scheduler_config.json``) fine-tunes only under its own noise
    schedule: diffusion.* must give the same β's and T; a one-line ConfigError otherwise."""
    schedule, beta_start, beta_end = BETA_SCHEDULES[cfg.schedule]
    theirs = (base.get("beta_schedule"), base.get("beta_start"), base.get("beta_end"))
    named = next((n for n, (s, b1, b2) in BETA_SCHEDULES.items() if (s, b1, b2) == theirs), None)
    if (schedule, beta_start, beta_end) != theirs:
        fix = f'set diffusion.schedule = "{named}"' if named else "no diffusion.schedule gives its β's"
        raise ConfigError(
            f"diffusion.schedule = {cfg.schedule!r} does not match the noise schedule {where} was trained "
            f"with ({theirs[0]}, β from {theirs[1]} to {theirs[2]}): {fix}"
        )
    if base.get("num_train_timesteps", 1000) != cfg.num_train_timesteps:
        raise ConfigError(
            f"diffusion.num_train_timesteps = {cfg.num_train_timesteps} does not match {where}'s "
            f"{base.get('num_train_timesteps', 1000)}"
        )


def _ddpm(config) -> SchedulerMixin:
    return DDPMScheduler.from_config(config)


def _ddim(config) -> SchedulerMixin:
    return DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=config.clip_sample)


def _dpm(config) -> SchedulerMixin:
    return DPMSolverMultistepScheduler.from_config(
        config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=config.clip_sample,
        sample_max_value=1.0,
        timestep_spacing="trailing",
    )


SAMPLERS = {"ddpm": _ddpm, "ddim": _ddim, "dpm": _dpm}


def build_sampler(name: str, train_scheduler: SchedulerMixin, steps: int) -> SchedulerMixin:
    """A fresh sampler (schedulers are stateful) with ``steps`` timesteps set."""
    if name not in SAMPLERS:
        raise ConfigError(f"sample.sampler = {name!r} is not valid; choose one of: {', '.join(SAMPLERS)}")
    total = train_scheduler.config.num_train_timesteps
    if not 1 <= steps <= total:
        raise ConfigError(f"sample.steps = {steps} must be between 1 and {total}")
    sampler = SAMPLERS[name](train_scheduler.config)
    sampler.set_timesteps(steps)
    return sampler
