"""What the training loop watches: non-finite losses, representation collapse, bad images."""
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)


def loss_is_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all of them must take the same branch)."""
    finite = torch.isfinite(loss.detach()).reshape(1)
    return bool(accelerator.gather(finite).all())


class CollapseMonitor:
    """Logs a warning when the logged `embedding_std` falls below `fraction / sqrt(dim)` (and when it recovers).

    The std over a batch of L2-normalised d-dim embeddings is about 1/sqrt(d) when they are spread out and 0
    when every image gets the same embedding (collapse). DINO also logs `teacher_entropy` (collapse: 0 or ln K).
    """

    def __init__(self, fraction: float | None, dim: int):
        self.threshold = None if fraction is None else fraction / math.sqrt(dim)
        self.fraction, self.dim = fraction, dim
        self.collapsed = False

    def check(self, record: dict) -> bool:
        """Whether `record` shows a collapse; warns on the way down, logs on the way back up."""
        std = record.get("embedding_std")
        if self.threshold is None or std is None:
            return False
        collapsed = std < self.threshold
        if collapsed and not self.collapsed:
            extra = f", teacher_entropy {record['teacher_entropy']:.4g}" if "teacher_entropy" in record else ""
            logger.warning("representation collapse at step %d: embedding_std %.4g < collapse_std_fraction %g / "
                           "sqrt(%d) = %.4g%s", record["step"], std, self.fraction, self.dim, self.threshold, extra)
        elif self.collapsed and not collapsed:
            logger.warning("embedding_std recovered at step %d: %.4g >= %.4g", record["step"], std, self.threshold)
        self.collapsed = collapsed
        return collapsed


class BadImageLog:
    """OUTPUT_DIR/bad_images.txt: one `row/file<TAB>reason` line per bad image, each listed once, written as
    they are found (a killed run keeps its list; a resumed run adds to it, a fresh run starts it anew)."""

    def __init__(self, path: Path, is_main_process: bool, resumed: bool):
        self.path, self.write = path, is_main_process
        self.seen: set[str] = set()
        if is_main_process and path.is_file():
            if resumed:
                self.seen.update(line for line in path.read_text().splitlines() if line)
            else:
                path.unlink()

    @property
    def count(self) -> int:
        return len(self.seen)

    def add(self, entries: list[str]) -> None:
        new = [e for e in dict.fromkeys(entries) if e not in self.seen]
        if not new:
            return
        self.seen.update(new)
        if self.write:
            with self.path.open("a") as f:
                f.write("".join(e + "\n" for e in new))
