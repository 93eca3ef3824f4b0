"""Entry point of group ``verl.plugins``: ``import verl`` imports this module, which registers our extensions.

Each extension lives in its own small module; this file only imports them so their registry decorators run.
"""

# Trainer mode "masksearch_curriculum" (trainer.v1.trainer_mode): masked-span-count curriculum sampler.
import masksearch_rl.curriculum.trainer  # noqa: E402,F401
# Agent loop "masksearch_agent" (rows' agent_name): the think/search/information/answer tag protocol.
import envs.agent_loop  # noqa: E402,F401
