"""The command line (no torch at import): the Typer app and each command's options."""
