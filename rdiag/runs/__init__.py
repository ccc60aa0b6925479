"""Runs: what a run is, how it trains, how a sweep executes, where it is stored.

``config`` (:class:`~rdiag.runs.config.TrainConfig`, sweep configs, shards) ->
``training`` (one run: :func:`~rdiag.runs.training.train`) -> ``executors`` /
``ray_executor`` (how runs execute) -> ``sweep`` (a grid of runs) -> ``store``
(SQLite + arrays; ``errors``: its errors by cause), ``writer`` (one writer per
store), ``merge`` (shards into one store). Nothing is imported here.
"""
