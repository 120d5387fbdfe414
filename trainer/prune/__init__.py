"""The slimming engine: units, thresholds, masks, budgets."""
