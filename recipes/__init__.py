"""Hydra configs and launch scripts; a package so configs resolve as ``pkg://recipes.configs`` after install."""
