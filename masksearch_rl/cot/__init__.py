"""Agent-based CoT trajectory construction (MaskSearch's start-up data) and its tag-format rendering.

agents.py    Planner / Rewriter / Observer prompts and strict JSON parsers
tasks.py     RAMP items and QA questions read as one Task type
pipeline.py  the resumable construction job (``masksearch-rl cot build``) and the judge labelling
scripted.py  a scripted OpenAI-compatible server playing every role over the synthetic world (tests, demos)
cli.py       ``register(app)``: the ``cot`` command group
"""
