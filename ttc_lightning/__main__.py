from ttc_lightning.run.cli import entry_point

entry_point()
