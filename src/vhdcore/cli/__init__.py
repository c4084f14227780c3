"""Sub-commands of the ``vhdcore`` CLI, one module each (see vhdcore.cli.main)."""
