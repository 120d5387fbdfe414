"""slimtune as a library: network slimming for any ``nn.Module`` with BatchNorm.

::

    import slimtune
    reg = slimtune.Sparsity(model, lam=1e-4)          # reg.step() after loss.backward()
    pruned, report = slimtune.prune(model, ratio=0.5)
    slimtune.save(pruned, "pruned.pth")               # torch.load(weights_only=True) reads it

Every public name is here (docs/python.md shows each); the command line runs the same engine
(``trainer``). Bad arguments raise ``ParamError`` (a ``ValueError``) or ``TypeError`` naming
the parameter; unusable files raise ``CheckpointError``.
"""

from slimtune.data import dataset
from slimtune.measure import evaluate, profile
from slimtune.models import create_model, load, name_of, save
from slimtune.pruning import PruneReport, prune
from slimtune.sparsity import Sparsity
from slimtune.training import finetune
from trainer.errors import CheckpointError, DataError, ParamError, UserError

__all__ = ["CheckpointError", "DataError", "ParamError", "PruneReport", "Sparsity",
           "UserError", "create_model", "dataset", "evaluate", "finetune", "load", "name_of",
           "profile", "prune", "save"]
