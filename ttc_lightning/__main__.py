from ttc_lightning.cli import main

main()
