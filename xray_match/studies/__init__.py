"""Multi-run drivers: what trains, scores or mines across more than one run (a recipe is one run's
glue). ``dspe_localize``: DSPE's two-stage phrase localization; ``grounding``: the grounding
study's data and the paper's tables; ``grounding_stage1``: the MNIST backbone pretraining.
Studies build on the library (recipes, train, tune, tracking) and never on ``launch`` or jobs."""
