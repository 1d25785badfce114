"""Built-in recipes, one module per method: the glue between a model, its loss, its data and the
shared loop. Nothing here runs more than one training run (multi-run drivers: ``xray_match.studies``).

Each module is named by an entry point of the group ``xray_match.recipes`` in ``pyproject.toml``
(``name = "xray_match.recipes.<module>"``): the registry imports a module only when its recipe is
looked up, so loading a config imports no torch; ``tests/test_layout.py`` checks the entry points
against what the modules register.
"""
