"""Entry point of group ``verl.plugins``: ``import verl`` imports this module, which registers our extensions.

Each extension lives in its own small module; this file only imports them so their registry decorators run.
"""
