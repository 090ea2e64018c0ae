"""What SFT and RL runs share: the run config, building the mesh / model / task from it, the task adapters
(token arrays <-> task examples and rewards), greedy evaluation and the metrics log."""
