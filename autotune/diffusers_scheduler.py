"""Replay a schedule file inside any diffusers pipeline, through the scheduler API pipelines call.

    >>> pipe.scheduler = AutotuneScheduler.from_schedule("s.json", pipe.scheduler.config)   # doctest: +SKIP
    >>> images = pipe(num_inference_steps=pipe.scheduler.num_inference_steps).images        # doctest: +SKIP

The scheduler holds no solver formula of its own: it builds the schedule's :class:`Plan` with
``coefficients.make_plan`` on the noise schedule of the pipeline's scheduler config (read by the same
``read_scheduler_config`` the model adapters use) and runs it with the executor's own interpreter
(``sampling.program.interpret``), paused at each model call: ``step()`` hands it the pipeline's network output
and returns the state of the next call. The pipeline feeds its network the values of ``timesteps``, which are
exactly the model times
the adapter feeds (``noise.model_time``, snapped to integers within 1e-6), so a pipeline with this
scheduler and ``autotune sample`` make the same network calls on the same states.

For VP models ``init_noise_sigma`` is 1 and ``scale_model_input`` is the identity, as the pipelines expect.
For flow-matching pipelines (a FlowMatch scheduler config, or ``use_flow_sigmas``) the network is fed sigma x N
as a float, the keys the pipeline reads to compute ``mu`` are kept, and ``set_timesteps`` takes the ``sigmas=``
/ ``mu=`` that SD3 / Flux pipelines pass (their defaults accepted, a conflicting list refused with one line).
Guidance stays the pipeline's business (StableDiffusionPipeline applies CFG before calling ``step``).
Skip masks cannot be replayed (a pipeline calls its own network; the scheduler cannot bypass blocks), so a
schedule with any is refused by ``from_schedule`` with one error. Nothing is clipped: a DDPM config's
``clip_sample`` / ``timestep_spacing`` are ignored because the schedule decides every time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generator, Mapping

import torch

from autotune.errors import ModelError, SamplingError, ScheduleError

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ModelError("AutotuneScheduler needs diffusers: pip install 'autotune-diffusion[diffusers]'") from e

from autotune.models.diffusers_dir import is_flow_config, read_flow_scheduler_config, read_scheduler_config
from autotune.sampling.coefficients import make_plan
from autotune.sampling.program import Call, interpret
from autotune.sampling.noise import NoiseSchedule, noised, starts_from_image
from autotune.space.fileformat import from_dict, load, to_dict
from autotune.space.schedule import Schedule
from autotune.space.solvers import solver_info

# the keys of a diffusers scheduler config that define the noise schedule and the network's output
CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
               "rescale_betas_zero_snr")
# a flow pipeline reads these from its scheduler's config (to compute mu, or to decide which sigmas to pass):
# kept so that it calls set_timesteps as it would with its own scheduler; they do not change the replay
FLOW_CONFIG_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                    "max_image_seq_len", "time_shift_type", "shift_terminal", "use_flow_sigmas", "flow_shift")
SIGMA_TOL = 1e-4  # sigmas a pipeline passes are float32 copies of ours at best
ROUND_TOL = 1e-6  # the adapters' round_time: a model time within this of an integer is fed as that integer


def check_replayable(schedule: Schedule, source: str | None = None) -> None:
    """Raise ScheduleError if the schedule needs something the scheduler API cannot do: skip or reuse masks, or an
    analytic first step (it moves the state before the first model call, which a pipeline makes on its own latents)."""
    for k, step in enumerate(schedule.steps):
        if solver_info(step.solver).calls(step.order) == 0:
            raise ScheduleError(
                f"steps[{k}].solver",
                f"{step.solver!r} replaces the step's model call (an analytic first step) and cannot be replayed by "
                "a diffusers scheduler (the pipeline makes the first model call on its initial latents); run this "
                "schedule with `autotune sample`, or search again with `--no-analytic-first`", source)
        if step.skip:
            raise ScheduleError(
                f"steps[{k}].skip",
                "skip masks cannot be replayed by a diffusers scheduler (the pipeline calls its whole network); "
                "run this schedule with `autotune sample` instead", source)
        if step.reuse:
            raise ScheduleError(
                f"steps[{k}].reuse",
                "reused units cannot be replayed by a diffusers scheduler (the pipeline calls its whole network); "
                "run this schedule with `autotune sample` instead", source)


def fed_timesteps(noise: NoiseSchedule, times: torch.Tensor) -> torch.Tensor:
    """The model times the adapter feeds the network at ``times`` (TorchDenoiser.model_time, with round_time for
    discrete models; a flow model is fed sigma x N as a float, as FlowMatchEulerDiscreteScheduler feeds it)."""
    tm = noise.model_time(times.to(torch.float64))
    if noise.kind != "flow":
        tm = torch.where((tm - tm.round()).abs() < ROUND_TOL, tm.round(), tm)
    # float32: what the adapter feeds a float32 network, and what diffusers' time embedding computes in anyway
    return tm.to(torch.float32)


def _same_timestep(a: float, b: float) -> bool:
    """Two model times are the same timestep: equal up to the float32 round trips a pipeline puts them through
    (relative to ``b``, at least 1e-3 absolute)."""
    return abs(a - b) <= 1e-3 * max(1.0, abs(b))


@dataclass
class ReplayState:
    """One run through the schedule between set_timesteps and its last step(): the interpreter, paused at the
    model call the pipeline makes next."""

    calls: int = 0  # step() calls so far
    run: Generator | None = None  # sampling.program.interpret, started at the first step()
    generator: torch.Generator | None = None  # the one the latest step() was handed (stochastic solvers draw on it)


class AutotuneScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that replays one autotune schedule exactly as ``autotune sample`` runs it.

    Build it with :meth:`from_schedule`; the config keeps the schedule document and the noise-schedule keys,
    so ``save_pretrained`` / ``from_pretrained`` round-trip it inside a pipeline directory.

    Args:
        schedule: the schedule document (``autotune.space.fileformat.to_dict``).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
            rescale_betas_zero_snr: the pipeline's noise schedule and network output, as in its scheduler config.

    Raises:
        ScheduleError: no schedule, an invalid one, or one with skip masks.
        ModelError: a noise schedule or prediction type autotune does not support.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> from autotune.sampling.named import build
        >>> base = DDPMScheduler(num_train_timesteps=1000)
        >>> s = build("dpmsolver++2m", read_scheduler_config(dict(base.config))[0], 5)
        >>> sched = AutotuneScheduler.from_schedule(s, base.config)
        >>> sched.set_timesteps(5)
        >>> sched.timesteps.tolist()
        [999.0, 799.0, 599.0, 400.0, 200.0]
    """

    config_name = "scheduler_config.json"
    order = 1  # one network call per timestep

    @register_to_config
    def __init__(
        self,
        schedule: dict | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        flow: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
    ) -> None:
        if schedule is None:
            raise ScheduleError("schedule", "AutotuneScheduler needs one: AutotuneScheduler.from_schedule(path, "
                                            "pipe.scheduler.config)")
        self.schedule = from_dict(schedule)
        check_replayable(self.schedule)
        if flow:  # the flow ODE only: the pipeline's shift picks sigmas, and the schedule has already picked them
            self.noise = read_flow_scheduler_config({"num_train_timesteps": int(num_train_timesteps)})
            self.parameterization = "flow"
        else:
            self.noise, self.parameterization, _ = read_scheduler_config(
                {k: v for k, v in dict(self.config).items() if k in CONFIG_KEYS})
        self.plan = make_plan(self.schedule, self.noise)
        self.init_noise_sigma = float(self.noise.init_scale())
        self.num_inference_steps = self.schedule.nfe
        # every model call in order (a two-call step calls twice; the final denoise once more), as diffusers' own
        # two-call schedulers list them: timesteps has one entry per network call
        self._call_times = torch.stack([c.time for c in self.plan.calls])
        # where the state is at each call: the call's time unless the step shifts what the network is told
        unshifted = self.schedule.with_steps(replace(s, shift=0.0) for s in self.schedule.steps)
        self._state_times = (self._call_times if unshifted == self.schedule
                             else torch.stack([c.time for c in make_plan(unshifted, self.noise).calls]))
        self._own = fed_timesteps(self.noise, self._call_times)  # the model times this schedule calls at
        self.timesteps = self._own
        # a schedule starting below T is the tail an image-to-image pipeline runs: it may ask for more steps and
        # then start at the index where the schedule's own steps begin (set_begin_index)
        self.partial = starts_from_image(self.noise, self.schedule.t_start)
        self._begin = 0
        self._state: ReplayState | None = None

    @classmethod
    def from_schedule(cls, schedule: Schedule | str | Path, config: Mapping[str, Any]) -> "AutotuneScheduler":
        """The scheduler replaying ``schedule`` (a Schedule or a schedule file) for a pipeline whose current
        scheduler has ``config`` (``pipe.scheduler.config``: its betas and prediction type are kept)."""
        source = None
        if not isinstance(schedule, Schedule):
            source = str(schedule)
            schedule = load(schedule)
        check_replayable(schedule, source)
        config = dict(config)
        if is_flow_config(config):
            flow_keys = {k: config[k] for k in FLOW_CONFIG_KEYS if k in config}
            return cls(schedule=to_dict(schedule), flow=True, num_train_timesteps=config.get("num_train_timesteps", 1000),
                       **flow_keys)
        return cls(schedule=to_dict(schedule), **{k: config[k] for k in CONFIG_KEYS if k in config})

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    @property
    def next_call(self) -> int:
        """Index (in the schedule's model calls) of the network call the pipeline makes next: the steps taken so far
        in this run (``autotune.diffusers_masks`` runs that call's unit masks)."""
        if self._state is None:
            raise SamplingError("AutotuneScheduler: call set_timesteps first")
        return self._state.calls

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
    ) -> None:
        """Start a new run; ``num_inference_steps`` must be the schedule's NFE (or None).

        Flow pipelines pass ``mu`` (ignored: the schedule fixed its sigmas when it was searched) and Flux's passes
        ``sigmas=linspace(1, 1/n, n)`` (its default, accepted). Any other ``sigmas`` or ``timesteps`` list must be
        the schedule's own; a conflicting one is refused with one line, never silently replaced.
        """
        nfe = self.schedule.nfe
        given = sigmas if sigmas is not None else timesteps
        if num_inference_steps is None and given is not None:
            num_inference_steps = len(given)
        total = nfe if num_inference_steps is None else int(num_inference_steps)
        if self.partial and total > nfe and timesteps is None:
            if sigmas is not None:  # Flux's img2img passes its default linspace(1, 1/N, N) for the whole run
                self._check_given("sigmas", sigmas, None, self._default_sigmas(total))
            self._begin = total - nfe
            lead = torch.linspace(float(self.noise.T), self.schedule.t_start, self._begin + 1, dtype=torch.float64)[:-1]
            timesteps_now = torch.cat([fed_timesteps(self.noise, lead), self._own])
        else:
            if total != nfe:
                raise SamplingError(
                    f"num_inference_steps={num_inference_steps}: this scheduler replays "
                    f"{self.schedule.name or self.schedule.hash()} with exactly {nfe} model evaluations; "
                    f"call the pipeline with num_inference_steps={nfe}")
            if sigmas is not None:
                self._check_given("sigmas", sigmas, self._own_sigmas(), self._default_sigmas(nfe))
            if timesteps is not None:
                self._check_given("timesteps", timesteps, self._own.to(torch.float64).cpu(), None)
            self._begin = 0
            timesteps_now = self._own
        self.timesteps = timesteps_now.to(device) if device is not None else timesteps_now
        self._state = ReplayState()

    def _own_sigmas(self) -> torch.Tensor:
        """The schedule's model-call times as diffusers' ``sigmas``: sigma itself for flow, sigma / alpha for VP."""
        times = self._call_times.to(torch.float64)
        if self.noise.kind == "flow":
            return times
        return self.noise.sigma(times) / torch.exp(self.noise.log_alpha(times))

    def _default_sigmas(self, nfe: int) -> torch.Tensor | None:
        # what FluxPipeline passes when its user gave none: not a choice to honour, so not a conflict
        return torch.linspace(1.0, 1.0 / nfe, nfe, dtype=torch.float64) if self.noise.kind == "flow" else None

    def _check_given(self, what: str, given: Any, own: torch.Tensor | None, default: torch.Tensor | None) -> None:
        try:
            values = torch.as_tensor([float(v) for v in given], dtype=torch.float64)
        except (TypeError, ValueError):
            raise SamplingError(f"set_timesteps({what}=...): expected a list of numbers") from None

        def same(ref: torch.Tensor | None) -> bool:
            return ref is not None and values.shape == ref.shape and bool(
                ((values - ref).abs() <= SIGMA_TOL * ref.abs().clamp(min=1.0)).all())

        if not (same(own) or same(default)):
            shown = ", ".join(f"{v:.4g}" for v in (own if own is not None else self._own_sigmas()).tolist())
            raise SamplingError(f"set_timesteps({what}=...): the pipeline asks for its own {what}, but this scheduler "
                                f"replays {self.schedule.name or self.schedule.hash()} ({what} {shown}); "
                                f"call the pipeline without {what}=")

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The identity: VP networks take the state as it is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One network output in, the state the schedule calls the network on next out (or the final sample).
        A stochastic schedule draws its fresh noise with ``generator``, as diffusers' SDE schedulers do."""
        state = self._state
        if state is None:
            raise SamplingError("AutotuneScheduler.step: call set_timesteps first")
        k = state.calls
        if k >= self.schedule.nfe:
            raise SamplingError(f"AutotuneScheduler.step: the schedule has {self.schedule.nfe} model evaluations; "
                                "step() was called once more (call set_timesteps to start again)")
        expected = float(self._own[k])
        if not _same_timestep(float(timestep), expected):
            raise SamplingError(f"AutotuneScheduler.step: timestep {float(timestep):g} is not the schedule's next "
                                f"({expected:g} at call {k}); the scheduler replays whole schedules from the start")
        state.generator = generator
        if state.run is None:  # the first call: start the interpreter on the pipeline's latents, in their dtype
            plan = self.plan.map_weights(lambda w: w.to(device=sample.device, dtype=sample.dtype))
            state.run = interpret(plan, sample, self.parameterization, self._draw)
            self._next_call(state.run, None)
        state.calls = k + 1
        prev_sample = self._next_call(state.run, (model_output.to(sample.dtype), sample))
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        generator = self._state.generator if self._state is not None else None
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    @staticmethod
    def _next_call(run: Generator, reply: Any) -> torch.Tensor:
        """Resume the interpreter with ``reply`` until it asks for the next model call: the state it asks for it at
        (what the pipeline evaluates next), or the final sample once the plan is done."""
        try:
            while True:
                ins, x = run.send(reply)
                if isinstance(ins, Call):
                    return x
                reply = None
        except StopIteration as done:
            return done.value

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Image-to-image pipelines start at ``begin_index``: it must be where this schedule's own steps begin."""
        if int(begin_index) != self._begin:
            what = (f"starts below T (t_start {self.schedule.t_start:g}) with {self.schedule.nfe} steps: call the "
                    f"pipeline with a num_inference_steps and strength that keep exactly {self.schedule.nfe} steps "
                    f"(int(N x strength) in SD / SDXL, N - int(N - N x strength) in SD3 / Flux)" if self.partial else
                    "starts at T: run it with strength 1 (or search a schedule for your strength)")
            raise SamplingError(f"set_begin_index({begin_index}): {self.schedule.name or self.schedule.hash()} {what}")

    def _time_of(self, timestep: Any) -> torch.Tensor:
        """The schedule time whose model time is ``timestep`` (the pipeline noises its image to our start)."""
        value = float(torch.as_tensor(timestep).flatten()[0])
        own = self._own.to(torch.float64).cpu()
        k = int((own - value).abs().argmin())
        if not _same_timestep(float(own[k]), value):
            raise SamplingError(f"AutotuneScheduler: timestep {value:g} is not one of the schedule's "
                                f"({', '.join(f'{v:g}' for v in own.tolist())})")
        return self._state_times[k]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t x0 + sigma_t eps`` at the schedule time of ``timesteps`` (DDPM-family image-to-image)."""
        return noised(self.noise, original_samples, noise, float(self._time_of(timesteps)))

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow image-to-image (SD3's): ``(1 - sigma) x0 + sigma eps`` at the schedule time of ``timestep``."""
        if noise is None:
            raise SamplingError("AutotuneScheduler.scale_noise: noise is required")
        return noised(self.noise, sample, noise, float(self._time_of(timestep)))
