"""The architectures slimtune slims: families, the registry lookup, building a model."""
