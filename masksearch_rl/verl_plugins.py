"""Entry point of group ``verl.plugins``: ``import verl`` imports this module, which registers our extensions.

Each extension lives in its own small module; this file only imports them so their registry decorators run.
verl catches a plugin's import error and logs it only at DEBUG level, so a broken extension would surface later as a
puzzling "unknown trainer/agent loop"; we log the real error at ERROR level first, naming the module.
"""

import importlib
import logging
import warnings

# verl's engine package warns once per optional backend it cannot import (torchtitan, veomni, automodel, mindspeed,
# megatron) in every process that imports it; none of them is used by our recipes, so those lines are only noise.
warnings.filterwarnings("ignore", message=r".* engine is not available", category=UserWarning)

EXTENSIONS = (
    # First: verl resolves its platform once, on the first get_platform() call, and importing almost any other
    # verl module makes that call. Platform "cpu" (VERL_PLATFORM=cpu, or auto-detected without an accelerator).
    "masksearch_rl.verl_ext.cpu_platform",
    # FSDP engines registered for the CPU device; trainer mode "masksearch_sync" (platform-ready training workers).
    "masksearch_rl.verl_ext.workers",
    "masksearch_rl.verl_ext.trainer",
    # Trainer mode "masksearch_curriculum" (trainer.v1.trainer_mode): masked-span-count curriculum sampler.
    "masksearch_rl.verl_ext.curriculum_trainer",
    # Agent loop "masksearch_agent" (rows' agent_name): the think/search/information/answer tag protocol.
    "envs.agent_loop",
    # Reward manager "masksearch" (reward.reward_manager.name): DAPO overlong shaping + the rollout's extra fields.
    "reward.manager",
    # Rollout backend "hf" (actor_rollout_ref.rollout.name=hf): transformers generate, for machines without vLLM.
    "masksearch_rl.verl_ext.hf_rollout",
)


def _log_level_from_env() -> None:
    """``MASKSEARCH_LOG_LEVEL=INFO`` (or DEBUG, ...) shows our extensions' log lines in every process that imports
    verl: Ray workers log only WARNING and above otherwise. On a cluster this is how one sees, per worker and node,
    e.g. which search backend each agent-loop worker reached (``envs.search_client``)."""
    import os

    level = os.environ.get("MASKSEARCH_LOG_LEVEL", "").strip().upper()
    if not level:
        return
    for name in ("envs", "reward", "masksearch_rl"):
        package_logger = logging.getLogger(name)
        package_logger.setLevel(level)
        if not package_logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            package_logger.addHandler(handler)
            package_logger.propagate = False


_log_level_from_env()

for _name in EXTENSIONS:
    try:
        importlib.import_module(_name)
    except Exception:
        logging.getLogger(__name__).exception("MaskSearch-RL verl plugin %s failed to import", _name)
        raise
