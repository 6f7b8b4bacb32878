"""Checkpoints of a training run: `OUTPUT_DIR/checkpoints/step_N`, written atomically, restored strictly.

A checkpoint is accelerate's state (model weights as safetensors incl. buffers such as DINO's center or MoCo's
queue, optimizer, RNG states) plus the model's config.json, how the global batch was made (`batch_layout.json`)
and, for streaming, the position in the data stream.

Elastic resume: a map-style run written on N processes resumes on M with the same loss curve, as long as the
images per micro-step over all processes and the accumulation steps are the checkpoint's (the views, the sampler's
order and the BatchNorm statistics are functions of the global micro-batch, never of the per-process slice).
"""
import json
import logging
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

DATA_STATE_FILE = "data_state.json"
BATCH_LAYOUT_FILE = "batch_layout.json"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is."""


@dataclass(frozen=True)
class BatchLayout:
    """How a run makes its global batch. A resume must keep `micro_batch` and `accumulation`; the process count
    may change (not for a stream: each process reads its own shard of it)."""

    num_processes: int
    per_device: int
    accumulation: int
    streaming: bool

    @property
    def micro_batch(self) -> int:  # images per micro-step, over all processes
        return self.num_processes * self.per_device

    @property
    def global_batch(self) -> int:  # images per optimizer step
        return self.micro_batch * self.accumulation

    def describe(self) -> str:
        return (f"{self.global_batch} images per optimizer step ({self.num_processes} process(es) x "
                f"{self.per_device} per device x {self.accumulation} accumulation step(s))")

    @classmethod
    def read(cls, checkpoint: Path) -> "BatchLayout":
        try:
            return cls(**json.loads((checkpoint / BATCH_LAYOUT_FILE).read_text()))
        except (ValueError, TypeError) as err:  # not JSON, or not these four keys
            raise TrainingError(f"cannot resume from {checkpoint}: {BATCH_LAYOUT_FILE} is unreadable "
                                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def check_resumable(saved: BatchLayout, now: BatchLayout, checkpoint: Path) -> None:
    """TrainingError, saying what to set, unless this run makes the checkpoint's global batch the same way."""
    where = f"cannot resume from {checkpoint} on {now.num_processes} process(es)"
    if saved.streaming and saved.num_processes != now.num_processes:
        raise TrainingError(f"{where}: it is a streaming run written on {saved.num_processes} process(es), and a "
                            "stream is split between the processes (each reads its own shards), so the saved position "
                            f"holds for {saved.num_processes} only; resume on {saved.num_processes} process(es), "
                            "or train from a map-style dataset (no streaming), which resumes on any number")
    if saved.micro_batch == now.micro_batch and saved.accumulation == now.accumulation:
        return
    if saved.micro_batch % now.num_processes:
        fix = (f"{saved.micro_batch} images per micro-step cannot be split between {now.num_processes} processes: "
               f"use a process count that divides {saved.micro_batch}")
    else:
        fix = (f"keep it: --per_device_train_batch_size {saved.micro_batch // now.num_processes} "
               f"--gradient_accumulation_steps {saved.accumulation} (or --total_train_batch_size "
               f"{saved.global_batch} with those accumulation steps)")
    raise TrainingError(f"{where}: it was written with {saved.describe()}, this run makes {now.describe()}; the "
                        f"views and BatchNorm statistics are per micro-step, so {fix}")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints `checkpoints/step_N`, oldest first (`.tmp_step_N` are unfinished saves)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(output_dir: Path, value: str) -> Path:
    if value == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise TrainingError(f"--resume_from_checkpoint latest: no checkpoint under {output_dir / 'checkpoints'}")
        return found[-1]
    path = Path(value)
    if not (path.is_dir() and path.name.startswith("step_") and path.name[5:].isdigit()):
        raise TrainingError(f"--resume_from_checkpoint {value}: not a checkpoint directory (checkpoints/step_N)")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, save_total_limit: int | None,
                    model_config, layout: BatchLayout, data_state: dict | None = None) -> Path:
    """accelerate state written to a temporary dir, then renamed: a kill during the save keeps the old ones."""
    root = output_dir / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # config.json beside accelerate's model.safetensors: the checkpoint loads with from_pretrained / export.
        model_config.save_pretrained(tmp)
        (tmp / BATCH_LAYOUT_FILE).write_text(json.dumps(asdict(layout)))
        if data_state is not None:  # streaming: where the data stream is (plain JSON, no pickle)
            (tmp / DATA_STATE_FILE).write_text(json.dumps(data_state))
        if final.exists():  # renamed away first: a kill at any point leaves a complete step_N or none
            os.replace(final, root / f".tmp_old_step_{step}")
        os.replace(tmp, final)
        shutil.rmtree(root / f".tmp_old_step_{step}", ignore_errors=True)
        if save_total_limit:
            for old in checkpoint_dirs(output_dir)[:-save_total_limit]:
                doomed = root / f".tmp_deleting_{old.name}"  # never a half-deleted step_N
                os.replace(old, doomed)
                shutil.rmtree(doomed)
    accelerator.wait_for_everyone()
    return final


def rng_state_file(process_index: int, saved_processes: int) -> str:
    """The RNG states a process continues from: its own, or on a process the checkpoint did not have, process 0's.
    Every process seeds alike and draws alike (views come from their own seeded generators), so process 0's states
    are what an uninterrupted run on more processes would hold; `check_same_rng_states` makes sure."""
    return f"random_states_{process_index if process_index < saved_processes else 0}.pkl"


def required_checkpoint_files(accelerator: Accelerator, rng_file: str | None) -> list[str]:
    """What a resume needs: one model, one optimizer, safetensors weights, the batch layout and this process's RNG
    states (`rng_file`; None while the layout that names it is missing)."""
    files = ["model.safetensors", "optimizer.bin", BATCH_LAYOUT_FILE] + ([rng_file] if rng_file else [])
    if accelerator.scaler is not None:
        files.append("scaler.pt")
    return files


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, layout: BatchLayout) -> None:
    """`accelerator.load_state`, made strict: every piece of state must be there and really be restored; the
    global batch must be made as when the checkpoint was written (`layout`: this run's), on any number of processes.

    accelerate loads the weights from model.safetensors, and optimizer.bin / RNG states with
    `torch.load(weights_only=True)` (a pickle that would run code is refused); but it catches any failure to
    restore the RNG states and goes on with a log line. Here a missing file, a refused pickle, or RNG states that
    are not the saved ones raise a TrainingError naming the piece.
    """
    saved = BatchLayout.read(checkpoint) if (checkpoint / BATCH_LAYOUT_FILE).is_file() else None
    rng_file = rng_state_file(accelerator.process_index, saved.num_processes) if saved else None
    missing = [name for name in required_checkpoint_files(accelerator, rng_file) if not (checkpoint / name).is_file()]
    if missing:
        raise TrainingError(f"cannot resume from {checkpoint}: missing {', '.join(missing)} "
                            "(weights must be model.safetensors; optimizer and RNG states and the batch layout "
                            "are required)")
    check_resumable(saved, layout, checkpoint)
    if saved.num_processes != layout.num_processes:
        check_same_rng_states(checkpoint, saved.num_processes)
    try:
        accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as err:
        culprit = next((name for name in refused_state_files(checkpoint)), "a state file")
        raise TrainingError(f"cannot resume from {checkpoint}: {culprit} holds more than tensors and plain data "
                            f"(a pickle that could run code) and was refused (weights_only=True): "
                            f"{str(err).splitlines()[0]}") from None
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise TrainingError(f"cannot resume from {checkpoint}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if accelerator.process_index >= saved.num_processes:  # accelerate looked for a file of this process: none
        restore_rng_states(read_rng_states(checkpoint / rng_file))
    check_rng_restored(checkpoint / rng_file)


def read_rng_states(path: Path) -> dict:
    from accelerate.utils import load as accelerate_load

    try:
        return accelerate_load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any failure to read the file means the RNG cannot be restored
        raise TrainingError(f"cannot resume: the RNG states in {path} cannot be read "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def restore_rng_states(saved: dict) -> None:
    import random

    import numpy as np

    random.setstate(saved["random_state"])
    np.random.set_state(saved["numpy_random_seed"])
    torch.set_rng_state(saved["torch_manual_seed"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["torch_cuda_manual_seed"])


def same_rng_states(a: dict, b: dict) -> bool:
    """False also when either lacks a state or holds a malformed one (as `check_rng_restored` treats them)."""
    import numpy as np

    try:
        return (a["random_state"] == b["random_state"]
                and all(np.array_equal(x, y) for x, y in zip(a["numpy_random_seed"], b["numpy_random_seed"]))
                and torch.equal(a["torch_manual_seed"], b["torch_manual_seed"]))
    except (KeyError, TypeError, ValueError):
        return False


def check_same_rng_states(checkpoint: Path, saved_processes: int) -> None:
    """A resume on another process count maps processes by index; that is exact only if the saved processes' RNGs
    are one state (they are, unless something drew random numbers on some processes only)."""
    first = read_rng_states(checkpoint / "random_states_0.pkl")
    for index in range(1, saved_processes):
        if not same_rng_states(first, read_rng_states(checkpoint / f"random_states_{index}.pkl")):
            raise TrainingError(f"cannot resume from {checkpoint} on another number of processes: its "
                                f"{saved_processes} processes' RNG states differ (process {index} vs 0), so a process "
                                "count other than the checkpoint's cannot continue their random streams; resume on "
                                f"{saved_processes} process(es)")


def refused_state_files(checkpoint: Path) -> list[str]:
    """The pickled state files of `checkpoint` that `torch.load(weights_only=True)` refuses (an error path)."""
    from accelerate.utils import load as accelerate_load

    refused = []
    for path in sorted(checkpoint.iterdir()):
        if path.suffix in (".bin", ".pkl", ".pt"):
            try:
                accelerate_load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                refused.append(path.name)
    return refused


def check_rng_restored(path: Path) -> None:
    """TrainingError unless the global RNGs (python, numpy, torch, CUDA) now hold the states saved in `path`."""
    import random

    import numpy as np

    saved = read_rng_states(path)
    checks = {
        "python random": lambda: random.getstate() == saved["random_state"],
        "numpy": lambda: all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved["numpy_random_seed"])),
        "torch": lambda: torch.equal(torch.get_rng_state(), saved["torch_manual_seed"]),
    }
    if torch.cuda.is_available():
        checks["CUDA"] = lambda: all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(),
                                                                      saved["torch_cuda_manual_seed"]))
    for name, restored in checks.items():
        try:
            ok = restored()
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise TrainingError(f"cannot resume: the {name} RNG state saved in {path} was not restored "
                                "(accelerate's load_state skips RNG states it cannot load); refusing to continue "
                                "with a different random stream")


def supersede_after(output_dir: Path, step: int) -> None:
    """Start (or restart) the run's history at `step` (0: a fresh run in a used OUTPUT_DIR).

    What a previous run wrote about later steps belongs to a timeline that is being replaced: checkpoints
    `step_N` with N > step move to `checkpoints/superseded/` (so `latest` cannot pick them), metrics.jsonl
    records of later steps (and a line cut short by a kill) move to `metrics.superseded.jsonl`. Nothing is
    deleted except unfinished saves (`.tmp_*`). metrics.jsonl then holds each step at most once, in order.
    """
    root = output_dir / "checkpoints"
    if root.is_dir():
        for tmp in root.glob(".tmp_*"):
            logger.warning("removing %s, an unfinished checkpoint save", tmp)
            shutil.rmtree(tmp)
        later = [p for p in checkpoint_dirs(output_dir) if int(p.name[5:]) > step]
        for path in later:
            target, n = root / "superseded" / path.name, 1
            while target.exists():  # superseded before, by an earlier restart: keep both
                target, n = root / "superseded" / f"{path.name}.{n}", n + 1
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            logger.warning("moved %s to %s: training restarts at step %d", path, target, step)
    metrics = output_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    kept, superseded = [], []
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and record.get("step", 0) <= step
        except json.JSONDecodeError:
            record, keep = {"unreadable_line": line}, False
        if keep:
            kept.append(line)
        else:
            superseded.append(json.dumps({**record, "superseded_at_restart_from_step": step}))
    if superseded:
        with (output_dir / "metrics.superseded.jsonl").open("a") as f:
            f.write("".join(line + "\n" for line in superseded))
        tmp = output_dir / "metrics.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, metrics)
        logger.warning("moved %d metrics.jsonl records after step %d to metrics.superseded.jsonl",
                       len(superseded), step)
