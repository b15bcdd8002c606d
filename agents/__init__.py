"""The learning side: a generic CleanRL-style PPO and its policies."""
