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

from trainer import dist

console = Console(highlight=False, soft_wrap=True)


def say(*objects, **kwargs) -> None:
    """Print on the main process only (the rank-0 policy)."""
    if dist.is_main():
        console.print(*objects, **kwargs)


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

    def start_epoch(self, epoch: int) -> None:
        self._t0, self._seen, self._running = time.perf_counter(), 0, ""
        if self._progress:
            self._progress.reset(self._batches, total=self.steps,
                                 description=f"epoch {epoch + 1}", info="")

    def step(self, step: int, steps: int, n: int,
             running: tuple[float, float] | None = None) -> None:
        """After each step; ``running`` = (loss, accuracy %) of the main rank's epoch so far."""
        self._seen += n * self.world  # every rank runs a batch of n per step
        if running is not None:
            self._running = f"loss {running[0]:.4f} acc {running[1]:.2f}%  "
        if self._progress:
            rate = self._seen / max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(self._batches, completed=step,
                                  info=f"{self._running}{rate:,.0f} img/s")

    def images_per_s(self) -> float:
        return self._seen / max(time.perf_counter() - self._t0, 1e-9)

    def end_epoch(self, line: str) -> None:
        if self._progress:
            self._progress.update(self._epochs, advance=1, info=line)
            self._progress.console.print(line)
        else:
            say(line)

    def close(self) -> None:
        if self._progress:
            self._progress.stop()
