"""autotune: search, fit and compile per-step sampling schedules for diffusion and flow models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: `import autotune` must not import diffusers (an optional dependency)
    if name == "AutotuneScheduler":
        from autotune.diffusers_scheduler import AutotuneScheduler

        return AutotuneScheduler
    if name == "apply_schedule":
        from autotune.diffusers_masks import apply_schedule

        return apply_schedule
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
