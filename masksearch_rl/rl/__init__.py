"""Launching verl PPO runs on our recipes and reporting their metrics."""
