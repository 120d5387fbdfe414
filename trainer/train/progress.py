"""Progress display on the main process: epoch and batch bars (loss, accuracy, images/s
over all ranks, ETA) on a terminal, one line per epoch elsewhere (logs, CI)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trainer.train import dist

console = Console(highlight=False, soft_wrap=True)


def say(*objects, **kwargs) -> None:
    """Print on the main process only (the rank-0 policy)."""
    if dist.is_main():
        console.print(*objects, **kwargs)


def heading(text: str) -> None:
    """A stage's heading line ("== 2. prune ..."), on the main process."""
    say(f"\n[bold cyan]== {text}[/]")


def split_first_step(first_s: float, first_images: int, total_s: float,
                     total_images: int) -> tuple[float, float]:
    """Split an epoch's time into the first step's excess over a typical step and the
    images/s of the other steps. One step only: all of it is excess, images/s of that step.
    """
    rest_s, rest_images = total_s - first_s, total_images - first_images
    if rest_images <= 0 or rest_s <= 0:
        return first_s, first_images / max(first_s, 1e-9)
    per_image = rest_s / rest_images
    return max(first_s - first_images * per_image, 0.0), rest_images / rest_s


class EpochProgress:
    """Bars for a run of ``epochs`` epochs of ``steps`` batches; silent on other ranks."""

    def __init__(self, title: str, epochs: int, steps: int, world_size: int, first_epoch: int = 0):
        self.world = world_size
        self.live = dist.is_main() and console.is_terminal
        self.steps = steps
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False)
            self._epochs = self._progress.add_task(title, total=epochs, completed=first_epoch,
                                                   info="")
            self._batches = self._progress.add_task("batches", total=steps, info="")
            self._progress.start()
        self._t0 = time.perf_counter()
        self._seen, self._running = 0, ""
        self._first = (0.0, 0)  # (seconds, images) of the epoch's first step

    def start_epoch(self, epoch: int) -> None:
        self._t0, self._seen, self._running = time.perf_counter(), 0, ""
        self._first = (0.0, 0)
        if self._progress:
            self._progress.reset(self._batches, total=self.steps,
                                 description=f"epoch {epoch + 1}", info="")

    def step(self, step: int, steps: int, n: int,
             running: tuple[float, float] | None = None) -> None:
        """After each step; ``running`` = (loss, accuracy %) of the main rank's epoch so far."""
        self._seen += n * self.world  # every rank runs a batch of n per step
        if step == 1:  # host time: it holds all of torch.compile's work, which is host-side
            self._first = (time.perf_counter() - self._t0, self._seen)
        if running is not None:
            self._running = f"loss {running[0]:.4f} acc {running[1]:.2f}%  "
        if self._progress:
            rate = self._seen / max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(self._batches, completed=step,
                                  info=f"{self._running}{rate:,.0f} img/s")

    def images_per_s(self) -> float:
        return self._seen / max(time.perf_counter() - self._t0, 1e-9)

    def split_first_step(self) -> tuple[float, float]:
        """(seconds the first step took beyond a typical step, images/s without it).

        For a compiled model the first step compiles forward and backward; this separates
        that one-off cost from the epoch's throughput.
        """
        return split_first_step(self._first[0], self._first[1],
                                time.perf_counter() - self._t0, self._seen)

    def end_epoch(self, line: str) -> None:
        if self._progress:
            self._progress.update(self._epochs, advance=1, info=line)
            self._progress.console.print(line)
        else:
            say(line)

    def close(self) -> None:
        if self._progress:
            self._progress.stop()
