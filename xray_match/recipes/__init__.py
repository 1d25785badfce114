"""Built-in recipes, one module per method: the glue between a model, its loss, its data and the
shared loop. Nothing here runs more than one training run (multi-run drivers: ``xray_match.studies``).

``BUILTIN`` maps each recipe name to the module that registers it. The registry imports a module
only when its recipe is looked up, so loading a config imports no torch; ``tests/test_layout.py``
checks this map against what the modules register.
"""

BUILTIN: dict[str, str] = {
    "moco": "xray_match.recipes.moco",
    "rdan": "xray_match.recipes.rdan",
    "dspe": "xray_match.recipes.dspe",
    "dspe_phrase": "xray_match.recipes.dspe_phrase",
    "grounding": "xray_match.recipes.grounding",
}
