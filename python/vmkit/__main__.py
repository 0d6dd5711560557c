from vmkit.cli import main

main()
