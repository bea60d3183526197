from ttc_lightning.run.cli import main

main()
