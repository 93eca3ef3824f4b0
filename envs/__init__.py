"""Search environment for verl.

- ``envs.prompts``: the tag protocol, prompt builders and every text the environment shows the policy.
- ``envs.search_client``: the one search client (shared backend, ``Doc i (Title: …)`` formatting, budgets, errors).
- ``envs.agent_loop``: agent loop ``masksearch_agent`` (tag protocol; registered by our ``verl.plugins`` entry point).
- ``envs.search_tool``: ``search`` tool for verl's hermes ``tool_agent`` loop (``envs/config/search_tool.yaml``).

This package imports nothing heavy at import time: ``envs.prompts`` is used by data and reward code without verl.
"""
