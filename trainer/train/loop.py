"""The loop's parts: LR schedule, optimizer, the sparsity term, stop requests, one training
epoch and exact evaluation. ``train_one_epoch`` and ``evaluate`` return metric dicts and do no
I/O (``trainer.train.fit`` runs the epochs and writes the files, on the main process only).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config.settings import RunConfig
from trainer.errors import HardStop, StopRequested, TrainingError
from trainer.models.family import unwrap_model
from trainer.train import dist

# ---------------------------------------------------------------- LR schedule


def lr_milestones(epochs: int) -> list[int]:
    """Epochs (0-based) at which the LR is divided by 10: 50% and 75% of the run."""
    return [m for m in (int(epochs * 0.5), int(epochs * 0.75)) if m > 0]


def decayed(lr: float, epochs: int, epoch: int) -> float:
    """``lr`` divided by 10 at each milestone (:func:`lr_milestones`) ``epoch`` has reached."""
    return lr * 0.1 ** sum(1 for m in lr_milestones(epochs) if epoch >= m)


def lr_at(run: RunConfig, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """LR for (epoch, step): base LR, /10 at each milestone, times a linear warm-up.

    A pure function of its arguments, so a resumed run follows the same schedule.
    """
    lr = decayed(run.lr, run.epochs, epoch)
    if run.warmup_epochs > 0:
        progress = (epoch + (step + 1) / max(steps_per_epoch, 1)) / run.warmup_epochs
        lr *= min(1.0, progress)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def make_optimizer(model: nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    params = unwrap_model(model).parameters()
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=run.lr, momentum=run.momentum,
                               weight_decay=run.weight_decay)
    return torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay)


def add_sparsity_grad(model: nn.Module, lam: float) -> None:
    """Network slimming: add the L1 sub-gradient lam * sign(gamma) to every BN weight grad.

    Called after backward() (and the DDP all-reduce) and before optimizer.step(); every
    rank adds the same term, so replicas stay identical.
    """
    if lam <= 0:
        return
    for m in unwrap_model(model).modules():
        if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.weight.grad is not None:
            m.weight.grad.add_(torch.sign(m.weight.detach()), alpha=lam)


def unscale_gradients(accelerator, optimizer) -> None:
    """Divide the grads by fp16's loss scale now, so the L1 term added next keeps its size.

    With a GradScaler (fp16 on CUDA) backward() leaves every grad multiplied by the scale
    (2**16 at first) and step() divides by it; a term added in between would shrink by that
    factor. step() sees the grads are already unscaled and does not divide again.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        scaler.unscale_(getattr(optimizer, "optimizer", optimizer))


# ---------------------------------------------------------------- stop requests


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM. Inside the training loop (``deferred``) a stop waits for the next
    step boundary, where every rank checks it; outside it (reading the data, building the
    model: start-up can take minutes) the run stops at once."""

    signum: int | None = None
    deferred: bool = False
    _previous: dict = field(default_factory=dict)

    def install(self) -> StopFlag:
        self.deferred = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. tests): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        first = self.signum is None
        if not first and signum == signal.SIGINT:
            raise HardStop  # a second Ctrl-C stops at once, and says so
        self.signum = signum
        # From now on a DataLoader worker's death is expected: the same signal sent to the
        # whole process group (Ctrl-C, a scheduler, `timeout`) ends the workers too, and
        # torch's SIGCHLD handler would raise "worker ... is killed by signal" from wherever
        # this process is then, e.g. DataLoader.__del__ after the clean stop message.
        self._previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        if first and not self.deferred:
            raise StopRequested(signum)  # nothing to finish: no step, no epoch under way

    @contextmanager
    def in_loop(self) -> Iterator[None]:
        """Within the block a stop waits for the loop's next step boundary."""
        before, self.deferred = self.deferred, True
        try:
            yield
        finally:
            self.deferred = before

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


STOP = StopFlag()


# ---------------------------------------------------------------- epoch / eval


def _forward(model: nn.Module, x: torch.Tensor, accelerator) -> torch.Tensor:
    if accelerator.mixed_precision == "no":
        # FP32 on purpose: half precision crashed in cublasLtMatmul on multi-GPU in the lab.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return model(x.float())
    with accelerator.autocast():
        return model(x)


def _check(losses: list[torch.Tensor], epoch: int, first_step: int, device) -> None:
    """Collective check (every rank calls it): non-finite loss anywhere, or a stop request.

    One MAX all-reduce of [bad, stop, -first bad step, -rank] gives every rank the same
    verdict and the same message (earliest bad step, lowest rank reporting it).
    """
    local_bad = -1
    if losses:
        finite = torch.isfinite(torch.stack(losses))
        if not bool(finite.all()):
            local_bad = first_step + int((~finite).nonzero()[0].item())
    never = -float(2 ** 40)
    flags = torch.tensor([1.0 if local_bad >= 0 else 0.0, 1.0 if STOP.signum else 0.0,
                          -float(local_bad) if local_bad >= 0 else never,
                          -float(dist.rank()) if local_bad >= 0 else never],
                         device=device, dtype=torch.float64)
    dist.all_reduce_max(flags)
    if flags[0] > 0:
        step, rank = int(-flags[2].item()) + 1, int(-flags[3].item())
        where = f" on rank {rank}" if dist.world_size() > 1 else ""
        raise TrainingError(
            f"loss became non-finite at epoch {epoch + 1}, step {step}{where}; lower --lr or "
            "add --warmup-epochs (the best checkpoint already written is intact)"
        )
    if flags[1] > 0:
        signum = STOP.signum or signal.SIGTERM
        raise StopRequested(signum, epoch + 1)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, ce: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE (Hinton et al. 2015; T² keeps
    the soft term's gradients on the scale of the hard one's). KL is averaged over the batch."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                    accelerator, run: RunConfig, epoch: int,
                    on_step: Callable[..., None] | None = None,
                    teacher: nn.Module | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns cross-entropy/accuracy over ALL ranks' real samples
    (a loader's ``real_samples``: the padding that evens out DDP shards is trained on but not
    counted). With a ``teacher`` (eval mode, no grad, not DDP-wrapped) the loss optimised is
    :func:`kd_loss` with ``run.kd_alpha``/``run.kd_temperature``.

    ``on_step(step, steps, n, running)`` follows every step; ``running`` is this rank's
    (loss, accuracy %) so far, read only right after a NaN/stop check (which already
    synchronised the device), else None.
    """
    model.train()
    device = accelerator.device
    steps = len(loader)
    check_every = 1 if device.type == "cpu" else 25  # a GPU sync every 25 steps is cheap
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, correct, count
    real, seen = getattr(loader, "real_samples", None), 0
    pending, pending_start = [], 0
    for step, (x, y) in enumerate(loader):
        set_lr(optimizer, lr_at(run, epoch, step, steps))
        out = _forward(model, x, accelerator)
        ce = F.cross_entropy(out.float(), y)
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                soft = _forward(teacher, x, accelerator).float()
            loss = kd_loss(out.float(), soft, ce, run.kd_alpha, run.kd_temperature)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if run.sparsity > 0:
            unscale_gradients(accelerator, optimizer)
            add_sparsity_grad(model, run.sparsity)
        optimizer.step()
        n = y.shape[0]
        n_real = n if real is None else min(n, max(0, real - seen))
        seen += n
        sums += _tally(out.detach(), y, ce.detach(), n_real)
        pending.append(loss.detach())
        running = None
        if (step + 1) % check_every == 0 or step + 1 == steps:
            _check(pending, epoch, pending_start, device)
            pending, pending_start = [], step + 1
            if on_step is not None and dist.is_main():
                c = max(sums[2].item(), 1.0)
                running = (sums[0].item() / c, 100.0 * sums[1].item() / c)
        if on_step is not None:
            on_step(step + 1, steps, n, running)
    totals = dist.all_reduce_sum(sums)
    total = max(totals[2].item(), 1.0)
    return {"train_loss": totals[0].item() / total, "train_acc": 100.0 * totals[1].item() / total,
            "train_samples": int(totals[2].item())}


def _tally(out: torch.Tensor, y: torch.Tensor, ce: torch.Tensor, n_real: int) -> torch.Tensor:
    """[loss sum, correct, count] of a batch's first ``n_real`` (real) samples."""
    if n_real < y.shape[0]:  # the shard's padding at its end: the rare batch that holds some
        out, y = out[:n_real], y[:n_real]
        ce = F.cross_entropy(out.float(), y) if n_real else ce.new_zeros(())
    hits = (out.argmax(1) == y).sum()
    # torch.full is a fill kernel; a tensor made from a Python number is a blocking host copy
    count = torch.full((), float(n_real), device=y.device, dtype=torch.float64)
    return torch.stack([ce.double() * n_real, hits.double(), count])


def eval_view(model: nn.Module) -> nn.Module:
    """The module to evaluate through: DataParallel stays (it splits the batch over GPUs);
    DDP/compile wrappers are dropped so evaluation runs no collectives per batch."""
    return model if isinstance(model, nn.DataParallel) else unwrap_model(model)


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BN running stats (DDP leaves them rank-local), so the
    evaluation matches the checkpoint rank 0 writes. A collective."""
    if dist.world_size() > 1:
        for buf in unwrap_model(model).buffers():
            dist.broadcast(buf, src=0)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, n: int) -> int:
    """Adaptive BatchNorm (Li et al., "EagleEye", ECCV 2020): forget every BatchNorm's running
    statistics and re-estimate them as the cumulative average (momentum None) over the first
    ``n`` of ``batches``, in train mode and without gradients; nothing else changes. Returns
    the batches used (0: the statistics are left as they were). Every rank then holds rank 0's
    statistics (a collective)."""
    bare = unwrap_model(model)
    bns = [m for m in bare.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    device = next(bare.parameters()).device
    momenta, was_training, used = [bn.momentum for bn in bns], bare.training, 0
    try:
        for x, _ in batches:
            if used == n:
                break
            if used == 0:  # only once a batch is there: no batch leaves the statistics alone
                for bn in bns:
                    bn.reset_running_stats()
                    bn.momentum = None
                bare.train()
            bare(x.to(device).float())
            used += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        bare.train(was_training)
    sync_buffers(bare)
    return used


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator) -> dict[str, float]:
    """Loss and accuracy over EXACTLY the test set, the same on every rank.

    A loader prepared by Accelerate pads the last batches so each rank has as many;
    ``gather_for_metrics`` drops the padding. A loader with ``exact_shard`` (the GPU
    loader) gives each rank an unpadded slice, so per-rank sums are all-reduced.
    """
    model.eval()
    device = accelerator.device
    exact = getattr(loader, "exact_shard", False)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, correct, count
    for x, y in loader:
        out = _forward(model, x.to(device, non_blocking=True), accelerator).float()
        y = y.to(device, non_blocking=True)
        losses = F.cross_entropy(out, y, reduction="none")
        hits = (out.argmax(1) == y)
        if not exact:
            losses, hits = accelerator.gather_for_metrics((losses, hits))
        # torch.full is a fill kernel; torch.tensor(n, device=cuda) is a blocking host copy
        # that would synchronise the stream on every batch.
        count = torch.full((), float(hits.numel()), device=device, dtype=torch.float64)
        sums += torch.stack([losses.double().sum(), hits.double().sum(), count])
    if exact:
        dist.all_reduce_sum(sums)
    total = int(sums[2].item())
    return {"loss": sums[0].item() / max(total, 1),
            "accuracy": 100.0 * sums[1].item() / max(total, 1),
            "correct": int(sums[1].item()), "total": total}
