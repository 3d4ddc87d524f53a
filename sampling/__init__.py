"""Noise schedules, the denoiser protocol, solver coefficients, the one executor, named schedules."""
