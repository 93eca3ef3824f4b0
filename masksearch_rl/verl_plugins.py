"""Entry point of group ``verl.plugins``: ``import verl`` imports this module, which registers our extensions.

Each extension lives in its own small module; this file only imports them so their registry decorators run.
verl catches a plugin's import error and logs it only at DEBUG level, so a broken extension would surface later as a
puzzling "unknown trainer/agent loop"; we log the real error at ERROR level first, naming the module.
"""

import importlib
import logging

EXTENSIONS = (
    # Trainer mode "masksearch_curriculum" (trainer.v1.trainer_mode): masked-span-count curriculum sampler.
    "masksearch_rl.curriculum.trainer",
    # Agent loop "masksearch_agent" (rows' agent_name): the think/search/information/answer tag protocol.
    "envs.agent_loop",
)

for _name in EXTENSIONS:
    try:
        importlib.import_module(_name)
    except Exception:
        logging.getLogger(__name__).exception("MaskSearch-RL verl plugin %s failed to import", _name)
        raise
