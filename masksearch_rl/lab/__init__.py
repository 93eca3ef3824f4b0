"""The learning lab: does anything learn? Multi-seed RL curves on the synthetic world, on CPUs, through verl.

``masksearch-rl lab`` builds, once, a tiny policy that can search and copy (copy pre-training and SFT on oracle
trajectories, through our SFT entry), measures what it can do (copy diagnostics), then runs RL arms through
``python -m verl.trainer.main_ppo`` with our plugins, exactly as a GPU user would, and writes the evidence:
``learning.json`` (every curve, every seed), ``learning.md`` (mean ± 95% CI, final and best) and PNG curves.

Modules: :mod:`~masksearch_rl.lab.config` (sizes, arms, the quick preset), :mod:`~masksearch_rl.lab.data` (world,
splits, RL parquets, SFT data), :mod:`~masksearch_rl.lab.policy` (tokenizer, model, pre-training, SFT,
diagnostics), :mod:`~masksearch_rl.lab.arms` (the RL runs), :mod:`~masksearch_rl.lab.report` (the outputs).
"""
