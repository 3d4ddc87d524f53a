"""Model adapters: any torch callable, diffusers pipeline directories, and the built-in models."""
