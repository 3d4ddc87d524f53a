"""Evaluation sets (search vs report noise), reference ODE solutions, and metrics."""
