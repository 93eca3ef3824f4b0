"""Self-Evolve Distillation (MaskSearch): a served teacher writes trajectories for fresh RAMP items, the judge filters
them, and the kept ones are merged into the trajectory set D_T that trains the next teacher.

iteration.py  one iteration given a served teacher: pick fresh items -> roll out (envs.rollout) -> judge -> merge
cli.py        ``register(app)``: ``masksearch-rl selfevolve iterate``
The N-iteration driver (SFT -> serve with vLLM -> iterate) is recipes/launch/selfevolve_loop.sh.
"""
