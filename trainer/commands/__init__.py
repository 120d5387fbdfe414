"""What each command does (the worker side): train, finetune, prune, evaluate, pipeline."""
