"""Reliability: bad images through the CLI, clear early errors, exact resume after SIGKILL (between checkpoints and
during a save), strict checkpoint loading (state files, RNG, pickles), non-finite losses, collapse warning."""
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_ssl.cli import main as cli_main
from hf_ssl.recipe import load_recipe
from hf_ssl.train import CollapseMonitor, TrainingError, train
from modeling import DinoForPreTraining
from tests.conftest import TINY_RECIPE
from tests.image_corpus import BAD_IMAGES, GOOD_ODD_IMAGES, encode, random_rgb

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HOOKED_CLI = Path(__file__).resolve().parent / "hooked_cli.py"
# 8 steps of 8 images: 6 steps per epoch (48 images), so the run crosses an epoch boundary; checkpoints at 3, 6.
RUN = ["--max_steps", "8", "--checkpointing_steps", "3", "--save_total_limit", "1", "--do_eval", "false"]


def write_recipe(directory: Path, dataset) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.yaml"
    path.write_text(TINY_RECIPE.format(output_dir=directory / "run", dataset=dataset))
    return path


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def train_records(run: Path) -> list[dict]:
    return [r for r in records(run) if "lr" in r]  # one per logged optimizer step


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def cli(capsys, *args) -> tuple[int, str]:
    """`hf-ssl ARGS` in this process: (exit status, stderr)."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset) -> Path:
    """The uninterrupted run every resumed run must reproduce bit for bit."""
    recipe = write_recipe(tmp_path_factory.mktemp("reference"), tiny_dataset)
    train(load_recipe(recipe, RUN))
    return recipe.parent / "run"


def assert_same_run(run: Path, reference: Path) -> None:
    """Each step logged exactly once, in order, with the uninterrupted run's values; the same final model."""
    got, want = train_records(run), train_records(reference)
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, want):
        for key in ("loss", "teacher_entropy", "teacher_center_kl", "embedding_std", "lr", "ema_momentum"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert same_tensors(run / "pretraining" / "model.safetensors", reference / "pretraining" / "model.safetensors")
    assert checkpoint_names(run) == ["step_6"]  # save_total_limit 1, no unfinished .tmp_* left


# ----------------------------------------------------------------------------------------- exact resume


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_latest_is_bitwise_the_uninterrupted_run(reference, tiny_dataset,
                                                                                          tmp_path):
    assert checkpoint_names(reference) == ["step_6"]  # save_total_limit respected
    recipe = write_recipe(tmp_path, tiny_dataset)
    run = tmp_path / "run"
    out = (tmp_path / "stdout").open("w")
    proc = subprocess.Popen([sys.executable, str(HOOKED_CLI), "block_after_step", "7", "train", recipe, *RUN],
                            stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 400
        while "BLOCKED" not in (tmp_path / "stdout").read_text():
            assert proc.poll() is None, (tmp_path / "stdout").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 7"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # step 7 done, its metrics written; last checkpoint: step 6
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [r["step"] for r in train_records(run)] == list(range(1, 8))
    assert checkpoint_names(run) == ["step_6"]

    train(load_recipe(recipe, [*RUN, "--resume_from_checkpoint", "latest"]))  # an epoch boundary: 6 steps/epoch

    assert_same_run(run, reference)
    # the killed run's step 7 was redone; its record is kept aside, not duplicated in metrics.jsonl
    (superseded,) = records(run, "metrics.superseded.jsonl")
    assert superseded["step"] == 7 and superseded["superseded_at_restart_from_step"] == 6
    assert superseded["loss"] == train_records(reference)[6]["loss"]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_keeps_the_previous_one_and_resume_ignores_the_leftover(
        reference, tiny_dataset, tmp_path, caplog):
    recipe = write_recipe(tmp_path, tiny_dataset)
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, str(HOOKED_CLI), "kill_in_save", "6", "train", recipe, *RUN],
                            capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert checkpoint_names(run) == [".tmp_step_6", "step_3"]  # the half-written save was never renamed
    assert not (run / "checkpoints" / ".tmp_step_6" / "config.json").exists()
    assert (run / "checkpoints" / "step_3" / "config.json").is_file()

    with caplog.at_level(logging.WARNING, logger="hf_ssl.train"):
        train(load_recipe(recipe, [*RUN, "--resume_from_checkpoint", "latest"]))  # step 3: mid-epoch

    assert ".tmp_step_6, an unfinished checkpoint save" in caplog.text
    assert_same_run(run, reference)
    assert [r["step"] for r in records(run, "metrics.superseded.jsonl")] == [4, 5, 6]


def test_restart_from_an_older_checkpoint_sets_later_checkpoints_aside(reference, tiny_dataset, tmp_path):
    """Resuming from step 3 while step 6 exists: step 6 belongs to the replaced timeline and `latest` must not
    pick it after the restart; a fresh run (step 0) in a used OUTPUT_DIR likewise starts a clean history."""
    import shutil

    recipe = write_recipe(tmp_path, tiny_dataset)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss": 1.0')  # a line cut short by a kill
    shutil.copytree(reference / "checkpoints" / "step_6", run / "checkpoints" / "step_3")  # any complete state
    train(load_recipe(recipe, ["--max_steps", "4", "--do_eval", "false", "--logging_steps", "2",
                               "--resume_from_checkpoint", str(run / "checkpoints" / "step_3")]))
    assert checkpoint_names(run) == ["step_3", "superseded"]
    assert (run / "checkpoints" / "superseded" / "step_6" / "model.safetensors").is_file()
    assert [r["step"] for r in train_records(run)] == [1, 2, 3, 4]
    superseded = records(run, "metrics.superseded.jsonl")
    assert [r.get("step") for r in superseded if "lr" in r] == [4, 5, 6, 7, 8]
    assert superseded[-1]["unreadable_line"] == '{"step": 9, "loss": 1.0'


# ----------------------------------------------------------------------------------------- strict loading


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("damage, message", [
    ("malicious_optimizer", r"optimizer\.bin holds more than tensors.*refused \(weights_only=True\)"),
    ("no_rng_file", r"missing random_states_0\.pkl"),
    ("garbage_rng_file", r"the RNG states in .*random_states_0\.pkl cannot be read"),
    ("incomplete_rng_file", r"the torch RNG state saved in .*random_states_0\.pkl was not restored"),
    ("no_safetensors", r"missing model\.safetensors"),
    ("no_batch_layout", r"missing batch_layout\.json"),
    ("garbage_batch_layout", r"batch_layout\.json is unreadable \(JSONDecodeError"),
])
def test_resume_refuses_a_checkpoint_it_cannot_restore_completely(reference, tiny_dataset, tmp_path, capsys,
                                                                  damage, message):
    import shutil

    recipe = write_recipe(tmp_path, tiny_dataset)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_6"
    shutil.copytree(reference / "checkpoints" / "step_6", checkpoint)
    marker = tmp_path / "code-ran"
    rng_file = checkpoint / "random_states_0.pkl"
    if damage == "malicious_optimizer":
        torch.save({"state": RunsCodeWhenUnpickled(marker)}, checkpoint / "optimizer.bin")
    elif damage == "no_rng_file":
        rng_file.unlink()
    elif damage == "garbage_rng_file":
        rng_file.write_bytes(b"not a pickle")
    elif damage == "incomplete_rng_file":  # accelerate restores python + numpy, then fails and only logs it
        torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state()}, rng_file)
    elif damage == "no_batch_layout":
        (checkpoint / "batch_layout.json").unlink()
    elif damage == "garbage_batch_layout":
        (checkpoint / "batch_layout.json").write_text("{not json")
    else:
        (checkpoint / "model.safetensors").rename(checkpoint / "model.bak")

    code, err = cli(capsys, "train", recipe, *RUN, "--resume_from_checkpoint", "latest")

    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not marker.exists()  # the pickle's code never ran
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.parametrize("overrides, message", [
    (["--per_device_train_batch_size", "4"],
     r"written with 8 images per optimizer step \(1 process\(es\) x 8 per device x 1 accumulation step\(s\)\), "
     r"this run makes 4 .*so keep it: --per_device_train_batch_size 8 --gradient_accumulation_steps 1 "
     r"\(or --total_train_batch_size 8"),
    (["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"],  # 8 per step, in 2 micro-steps
     r"this run makes 8 images per optimizer step \(1 process\(es\) x 4 per device x 2 accumulation step\(s\)\); "
     r"the views and BatchNorm statistics are per micro-step, so keep it: --per_device_train_batch_size 8 "
     r"--gradient_accumulation_steps 1"),
])
def test_resume_with_another_batch_layout_is_refused_saying_what_to_set(reference, tiny_dataset, tmp_path, capsys,
                                                                        overrides, message):
    import shutil

    recipe = write_recipe(tmp_path, tiny_dataset)
    shutil.copytree(reference / "checkpoints" / "step_6", tmp_path / "run" / "checkpoints" / "step_6")
    code, err = cli(capsys, "train", recipe, *RUN, *overrides, "--resume_from_checkpoint", "latest")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_resume_on_another_process_count_is_refused_when_the_saved_random_streams_differ(reference, tiny_dataset,
                                                                                         tmp_path, capsys):
    """A checkpoint said to be written by 2 processes of 4 images whose RNG states differ: 1 process of 8 images
    keeps the global batch, but cannot tell which random stream to continue."""
    import shutil

    recipe = write_recipe(tmp_path, tiny_dataset)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_6"
    shutil.copytree(reference / "checkpoints" / "step_6", checkpoint)
    (checkpoint / "batch_layout.json").write_text(json.dumps(
        {"num_processes": 2, "per_device": 4, "accumulation": 1, "streaming": False}))
    torch.manual_seed(1234)
    torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, checkpoint / "random_states_1.pkl")
    code, err = cli(capsys, "train", recipe, *RUN, "--resume_from_checkpoint", "latest")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "its 2 processes' RNG states differ (process 1 vs 0)" in err and "resume on 2 process(es)" in err, err


# ----------------------------------------------------------------------------------------- non-finite loss


def poison(monkeypatch, calls_to_poison) -> list[int]:
    """Make the loss of the given forward calls (1-based; one per step here) NaN. Forward itself runs as usual,
    so DINO's center and the BatchNorm statistics are updated as in a real blow-up."""
    calls, ema = [], []
    forward, post = DinoForPreTraining.forward, DinoForPreTraining.post_optimizer_step

    def nan_forward(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        calls.append(1)
        if calls_to_poison == "all" or len(calls) in calls_to_poison:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    def counted_post(self, momentum):
        ema.append(momentum)
        return post(self, momentum)

    monkeypatch.setattr(DinoForPreTraining, "forward", nan_forward)
    monkeypatch.setattr(DinoForPreTraining, "post_optimizer_step", counted_post)
    return ema


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tiny_recipe, tmp_path, capsys, monkeypatch):
    poison(monkeypatch, {3})
    code, err = cli(capsys, "train", tiny_recipe, "--max_steps", "4", "--checkpointing_steps", "2",
                    "--do_eval", "false")
    assert code == 2 and "Traceback" not in err, err
    good = tmp_path / "run" / "checkpoints" / "step_2"
    assert f"loss is nan at step 3 (epoch 0); the last good checkpoint is {good}" in err
    assert (good / "model.safetensors").is_file() and checkpoint_names(tmp_path / "run") == ["step_2"]


def test_nan_policy_skip_leaves_no_trace_of_the_step_and_counts_it(tiny_recipe, tmp_path, monkeypatch, caplog):
    ema = poison(monkeypatch, {2})
    with caplog.at_level(logging.WARNING, logger="hf_ssl.train"):
        train(load_recipe(tiny_recipe, ["--max_steps", "4", "--checkpointing_steps", "1", "--do_eval", "false",
                                        "--nan_policy", "skip"]))
    run = tmp_path / "run"
    logged = train_records(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in logged] == [0, 1, 0, 0]
    assert "loss" not in logged[1] and all(np.isfinite(r["loss"]) for r in logged if r["step"] != 2)
    assert "step 2 skipped (loss nan)" in caplog.text
    assert len(ema) == 3  # no EMA update for the skipped step
    ckpt = run / "checkpoints"
    # weights, EMA teacher, DINO center and BatchNorm statistics: exactly as before the skipped step
    assert same_tensors(ckpt / "step_1" / "model.safetensors", ckpt / "step_2" / "model.safetensors")
    assert not same_tensors(ckpt / "step_2" / "model.safetensors", ckpt / "step_3" / "model.safetensors")
    opt1, opt2 = (torch.load(ckpt / s / "optimizer.bin", weights_only=True)["state"] for s in ("step_1", "step_2"))
    assert opt1.keys() == opt2.keys()
    assert all(torch.equal(opt1[i][k], opt2[i][k]) for i in opt1 for k in opt1[i])  # no optimizer step either


def test_nan_policy_skip_stops_after_too_many_skipped_steps_in_a_row(tiny_recipe, monkeypatch):
    poison(monkeypatch, "all")
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 \(epoch 0\), after 2 skipped steps in a row"):
        train(load_recipe(tiny_recipe, ["--max_steps", "5", "--do_eval", "false", "--nan_policy", "skip",
                                        "--nan_max_consecutive_skips", "2"]))


# ----------------------------------------------------------------------------------------- collapse monitor


def test_collapse_monitor_warns_on_the_way_down_and_up(caplog):
    monitor = CollapseMonitor(0.1, dim=256)  # threshold 0.1 / 16
    with caplog.at_level(logging.WARNING, logger="hf_ssl.train"):
        assert not monitor.check({"step": 1, "embedding_std": 1 / 16})
        assert monitor.check({"step": 2, "embedding_std": 0.001, "teacher_entropy": 0.0})
        assert monitor.check({"step": 3, "embedding_std": 0.002})
        assert not monitor.check({"step": 4, "embedding_std": 0.05})
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # one on collapse, one on recovery: not one per logged step
    assert "representation collapse at step 2: embedding_std 0.001 < collapse_std_fraction 0.1 / sqrt(256)" \
        in warnings[0] and "teacher_entropy 0" in warnings[0]
    assert "recovered at step 4" in warnings[1]
    assert not CollapseMonitor(None, 256).check({"step": 1, "embedding_std": 0.0})


def test_training_logs_the_collapse_signals_and_warns_below_the_recipe_threshold(tiny_recipe, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_ssl.train"):
        train(load_recipe(tiny_recipe, ["--max_steps", "1", "--do_eval", "false", "--collapse_std_fraction", "1e6"]))
    (record,) = train_records(tmp_path / "run")
    assert 0 < record["embedding_std"] < 1 and record["teacher_entropy"] > 0
    # resnet of the tiny recipe: 16-dim pooled feature, so the threshold is 1e6 / 4
    assert "representation collapse at step 1" in caplog.text and "sqrt(16) = 2.5e+05" in caplog.text


# ----------------------------------------------------------------------------------------- bad images


def corpus_rows(n_plain: int) -> dict[str, bytes]:
    """name -> bytes: plain images, every valid odd image and every bad one."""
    rows = {f"plain/{i}.png": encode(random_rgb(28, 28, seed=i), "PNG") for i in range(n_plain)}
    rows.update({f"odd/{name}": make() for name, make in GOOD_ODD_IMAGES.items()})
    rows.update({f"bad/{name}": make() for name, (make, _) in BAD_IMAGES.items()})
    return rows


def test_cli_skip_policy_on_an_imagefolder_with_the_bad_image_corpus(tiny_recipe, tmp_path, capsys, caplog,
                                                                     monkeypatch):
    folder = tmp_path / "folder"
    rows = corpus_rows(24 - len(GOOD_ODD_IMAGES) - len(BAD_IMAGES))  # 24 rows: 3 batches of 8, every row seen
    for name, data in rows.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not the user's cache
    with caplog.at_level(logging.WARNING, logger="hf_ssl.train"):
        code, err = cli(capsys, "train", tiny_recipe, "--dataset_name", folder, "--on_bad_image", "skip",
                        "--do_eval", "false")
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    assert [r["step"] for r in train_records(run)] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in train_records(run))
    assert f"skipped {len(BAD_IMAGES)} bad images, listed in {run / 'bad_images.txt'}" in caplog.text
    lines = (run / "bad_images.txt").read_text().splitlines()
    assert len(lines) == len(BAD_IMAGES)
    for name, (_, reason) in BAD_IMAGES.items():
        (line,) = [line for line in lines if f"bad/{name}" in line]
        where, why = line.split("\t")
        assert re.fullmatch(rf"row \d+ \(.*bad/{re.escape(name)}\)", where) and reason in why, line


def saved_corpus(tmp_path, with_label=True) -> Path:
    rows = corpus_rows(3)
    names = list(rows)
    columns = {"image": [{"bytes": rows[n], "path": n} for n in names]}
    features = {"image": datasets.Image()}
    if with_label:
        columns["label"] = [0] * len(names)
        features["label"] = datasets.ClassLabel(names=["x"])
    path = tmp_path / "saved"
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return path


def test_cli_error_policy_names_the_row_the_file_and_the_reason(tiny_recipe, tmp_path, capsys):
    code, err = cli(capsys, "train", tiny_recipe, "--dataset_name", saved_corpus(tmp_path), "--on_bad_image",
                    "error", "--per_device_train_batch_size", "4", "--do_eval", "false",
                    "--dataloader_num_workers", "1")  # raised in a worker, re-raised by the DataLoader
    assert code == 2 and "Traceback" not in err, err
    found = re.search(r"Bad image at row (\d+) \(([\w.]+)\): (.*)\. Use on_bad_image='skip'", err)
    assert found, err
    assert BAD_IMAGES[found[2]][1] in found[3]


def test_an_all_bad_micro_batch_is_a_skipped_step_not_a_crash(tiny_recipe, tmp_path):
    path = tmp_path / "two_bad"
    rows = [{"bytes": encode(random_rgb(28, 28, seed=i), "PNG"), "path": f"{i}.png"} for i in range(2)]
    rows += [{"bytes": b"", "path": "empty.png"}, {"bytes": b"junk", "path": "junk.png"}]
    datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()})
                               ).save_to_disk(str(path))
    train(load_recipe(tiny_recipe, ["--dataset_name", str(path), "--per_device_train_batch_size", "1",
                                    "--on_bad_image", "skip", "--do_eval", "false"]))
    logged = train_records(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert sum(r["skipped_steps"] for r in logged) == 2 and sum("loss" in r for r in logged) == 2
    assert len((tmp_path / "run" / "bad_images.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("make, message", [
    ("empty", r"Split 'train' of dataset .* is empty"),
    ("no_image_column", r"has no Image column; the columns are \{'text': 'Value'"),
    ("no_label_column", r"kNN evaluation \(do_eval / eval_steps\) needs labels in split 'train': No label column"),
])
def test_unusable_datasets_are_clear_errors_before_any_work(tiny_recipe, tmp_path, capsys, make, message):
    path = tmp_path / make
    if make == "empty":
        datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()})
                                   ).save_to_disk(str(path))
    elif make == "no_image_column":
        datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(path))
    else:
        saved = saved_corpus(tmp_path, with_label=False)
        datasets.DatasetDict({"train": datasets.load_from_disk(str(saved)), "test": datasets.load_from_disk(
            str(saved))}).save_to_disk(str(path))
    code, err = cli(capsys, "train", tiny_recipe, "--dataset_name", path)
    assert code == 2 and "Traceback" not in err and re.search(message, err), err
    assert not (tmp_path / "run").exists()  # failed before any work: not even the output directory
