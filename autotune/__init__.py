"""autotune: search, fit and compile per-step sampling schedules for diffusion and flow models."""

__version__ = "0.1.0"
