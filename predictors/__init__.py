"""Predictors of schedule quality: S3's ranking-aware MLP ensemble and its scikit-learn comparison (``s3``).

:mod:`autotune.predictors.s3` featurises :class:`~autotune.space.encoding.ScheduleSpace` vectors (times as
log-SNR positions, choices one-hot) and learns ``log(metric)`` from a few truly evaluated schedules; the
``s3`` search strategy (:mod:`autotune.search.s3`) runs its evolutionary search on it. :mod:`autotune.predictors.cpr`
regresses fitted DC-Solver ratios over (step, NFE, guidance) with cascade polynomials.
"""
