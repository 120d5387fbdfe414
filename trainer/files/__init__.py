"""Files: atomic writes, safe loading, checkpoints, safetensors, export."""
