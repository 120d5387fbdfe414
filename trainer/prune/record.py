"""What a prune did, as one typed record: the figures a pruned checkpoint keeps (its ``prune``
field, plain values), what ``info``, ``pipeline`` and the report show, and what the Python
API's ``prune`` returns beside the model. One name per figure: ``acc_after`` is the test
accuracy right after pruning wherever it appears.

Pure Python: files written by earlier versions load as they are (unknown keys are kept aside,
missing ones are None).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import ParamError


@dataclass
class PruneRecord:
    """One prune: how much was asked and removed, the threshold, sizes and accuracies."""

    ratio: float | None = None  # the ratio asked, or the one a budget chose
    threshold: float | None = None  # the |γ| (score) at or below which channels went (global)
    scope: str = "all"
    criterion: str = "bn"  # how channels were scored (trainer.prune.criteria); older files: bn
    allocation: str = "global"  # one threshold, or the same ratio in every layer (uniform)
    min_channels: int = 1
    round_to: int = 1
    budget: dict[str, Any] | None = None  # kind, target, before, reached
    source: str | None = None  # the checkpoint pruned (None: a model in memory)
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None  # thop's MACs at input_size
    macs_after: int | None = None
    input_size: int | None = None
    removed_fraction: float | None = None  # share of the prunable channels removed
    ties: int = 0  # channels whose score equals the threshold (removed with it)
    min_channels_kept: list[str] = field(default_factory=list)  # units min_channels rescued
    stages: list[list[Any]] = field(default_factory=list)  # [stage, kept, total] (prunable)
    acc_before: float | None = None  # test accuracy before pruning (%)
    acc_after: float | None = None  # test accuracy right after pruning (%), as saved
    bn_recalibrate: int = 0  # training batches the BN statistics were re-estimated on (0: none)
    acc_after_stale: float | None = None  # with bn_recalibrate: acc_after before it (stale BN)
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as is

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as a checkpoint's ``prune`` field holds them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra"}
        return {**self.extra, **out}

    def notes(self, cli: bool = False) -> list[str]:
        """What a user should know about this prune (ties, the stem's |γ|, rescued layers),
        naming settings as Python does, or as flags with ``cli``."""
        def name(param: str) -> str:
            return ParamError.flag(param) if cli else param

        out, removed, ratio = [], self.removed_fraction or 0.0, self.ratio or 0.0
        what = "|γ|" if self.criterion == "bn" else f"{self.criterion} score"
        if self.allocation == "global" and self.scope == "all" and removed < 0.5 * ratio:
            # e.g. the lab's bn3 holds 2/3 of all channels and is never pruned: when its γ are
            # the smallest (zero-initialised, short training), the threshold lands among them.
            scores = "γ" if self.criterion == "bn" else f"{self.criterion} scores"
            out.append(f"the threshold fell among the {scores} of BatchNorms that are never "
                       f"pruned (the stem and each block's output BN); {name('scope')} prunable "
                       "ranks the pruned ones only")
        if self.ties > 1 and removed > ratio + 0.02:
            # e.g. γ that only the L1 term moved, by the same steps: equal to many digits
            out.append(f"{self.ties} channels have {what} equal to the threshold and are "
                       f"removed with it (only {what} strictly above is kept), so "
                       f"{100 * removed:.1f}% of the prunable channels went at ratio {ratio:g}; "
                       f"train longer or lower {name('ratio')}")
        if self.min_channels_kept:
            cut = ("the threshold would have emptied" if self.allocation == "global" else
                   f"⌊ratio·C⌋ would have left fewer than {self.min_channels} channels in")
            out.append(f"{cut} {len(self.min_channels_kept)} layer(s); kept their "
                       f"{self.min_channels} largest-{what} channel(s): "
                       f"{', '.join(self.min_channels_kept)}")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PruneRecord:
        """A record from a checkpoint's ``prune`` field (any version)."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        for key in ("ratio", "threshold", "acc_before", "acc_after", "removed_fraction",
                    "acc_after_stale"):
            if hasattr(known.get(key), "item"):  # a lab file's 1-element tensor
                known[key] = known[key].item()
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})


NUMBER = (int, float)
# The types a file may give each field (None is allowed for each), checked on load.
TYPES: dict[str, Any] = {"ratio": NUMBER, "threshold": NUMBER, "scope": str,
                         "min_channels": int, "round_to": int, "source": str,
                         "params_before": int, "params_after": int, "macs_before": int,
                         "macs_after": int, "acc_before": NUMBER, "acc_after": NUMBER,
                         "budget": Mapping, "stages": list, "min_channels_kept": list,
                         "criterion": str, "allocation": str, "bn_recalibrate": int,
                         "acc_after_stale": NUMBER}
