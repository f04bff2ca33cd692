"""One thin module per command: ``<Name>Options``, ``run(options) -> <Name>Result``; cli.py prints the result."""
