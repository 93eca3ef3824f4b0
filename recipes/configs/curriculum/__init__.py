"""Hydra config group ``curriculum`` (a package so its YAML ships in the wheel and resolves via pkg://)."""
