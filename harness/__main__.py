from tokenfleet.cli.main import main

main()
