"""The commands: one thin module each, ``run(options) -> result``; :mod:`satcli.cli` prints the result."""
