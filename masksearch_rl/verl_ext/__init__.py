"""Our verl extensions that are not about the task itself: the CPU platform and the HF rollout backend."""
