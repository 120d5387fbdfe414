"""Pure settings (no torch): every setting, command, architecture name, check and file name."""
