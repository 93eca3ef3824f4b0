"""Stage I recipes: DAPO on RAMP (a package so the YAML resolves as ``pkg://recipes.configs.ramp_dapo``)."""
