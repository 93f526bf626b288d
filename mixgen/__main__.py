from mixgen.cli import main

main()
