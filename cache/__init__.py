"""Persistent store of references and evaluations. Not built yet: see issue 4."""
