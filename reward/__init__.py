"""Hybrid reward for search agents: format + answer match (EM/F1/recall) or a model judge; verl compute_score entry.

Modules: ``format`` (tag protocol check), ``answer_match`` (metrics, also used by the eval harness), ``judge``
(LLM judge over an OpenAI-compatible endpoint), ``combine`` (config + combination rule) and
``masksearch_reward`` (the verl entry, ``pkg://reward.masksearch_reward``). Importing this package stays light:
the submodules are imported where used.
"""
