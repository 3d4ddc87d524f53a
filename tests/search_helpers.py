"""What the search tests share: the search context over the named seeds of a model."""

from autotune.sampling.named import NAMED, build
from autotune.search.strategy import SearchContext
from autotune.space.encoding import ScheduleSpace


def search_context(model, nfe=4, seed=0, **space):
    """The space of NFE-step schedules onto the data (ratios fixed) seeded with every named schedule."""
    seeds = tuple(build(n, model.noise, nfe) for n in NAMED)
    space = {"ratio_range": None, **space}
    return SearchContext(ScheduleSpace(nfe, model.noise.T, 0.0, **space), model.noise, seeds, seed)
