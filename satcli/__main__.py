from satcli.cli import main

main()
