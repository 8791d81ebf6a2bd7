from fineregion_pl.commands.cli import main

main()
