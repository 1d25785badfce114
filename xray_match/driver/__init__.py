"""xray_match.driver: the Ray side of one run and of a search. ``worker`` (Ray Train: workers,
report, resume, fault injection, MLflow from rank 0), ``prepare`` (the data and the recipe's
``prepare`` on the driver, before any worker starts), ``tuner`` (Ray Tune: search, ASHA, trials)
and ``storage`` (where Ray stores runs and checkpoints). The plain-PyTorch pieces they run
are in :mod:`xray_match.train`."""
