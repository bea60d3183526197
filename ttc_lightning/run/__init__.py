"""The run around the model: the `ttc` command, checks before it starts, run directories, checkpoints, callbacks,
the console, tracking, export and generate."""
