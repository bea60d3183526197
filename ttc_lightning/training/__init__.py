"""The training step's parts: GRPO's maths, log-probs, rollouts, dynamic sampling, the optimizer and its schedule."""
