"""Tiny CPU-oriented recipe (a package so the YAML resolves as ``pkg://recipes.configs.quickstart``)."""
