"""Distributed training gives the one-process result: collectives under a real gloo group (gradients of
all_gather_with_grad and SyncBatchNorm against one-process references, a MoCo v3 step under DDP, shuffle-BN, uneven
batches), and real 2-process CPU DDP through `accelerate launch` + the `hf-ssl train` CLI against 1-process runs for
every method (in float64: see test_two_processes_reproduce_one_process), elastic resume (a checkpoint written on 1
process resumed on 2, and on 2 resumed on 1), plus streaming (each sample once per epoch across the processes,
resume, refused on another process count).

The 2-process runs share one `accelerate launch` (tests/distributed_runs.py): starting processes is what costs.
"""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ssl.recipe import load_recipe
from hf_ssl.train import train

from .conftest import REPO_ROOT, TINY_RECIPE
from .test_train import ENV, losses
from .tiny_methods import VARIANTS, write_tiny_recipe

STEPS = 10
CHECKPOINT = 5  # elastic resume: from this step's checkpoint, on the other number of processes
# On the logged losses of float64 runs; they are logged in float32 (resolution ~1e-6 at a loss of 11).
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ collectives, gloo


def _collectives_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from modeling.distributed import (all_gather, all_gather_with_grad, all_gather_with_offset, batch_shuffle,
                                      batch_unshuffle, convert_sync_batchnorm, is_distributed)
    from modeling.losses import koleo_loss, moco_v3_loss

    one_process = _moco_v3_one_process_step()  # before the group: one process's computation
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert is_distributed()
        torch.manual_seed(0)  # the same global data and weights on every process
        inputs, weight = torch.randn(12, 5), torch.randn(5, 4)
        local = slice(6 * rank, 6 * rank + 6)

        def ddp_grad(param):  # what DDP does with the gradients: the mean over processes
            grad = param.grad.clone()
            dist.all_reduce(grad)
            return grad / world

        # all_gather_with_grad: KoLeo of the local rows against the gathered batch == KoLeo of the whole batch
        w = weight.clone().requires_grad_()
        features = inputs[local] @ w
        gathered, offset = all_gather_with_grad(features)
        assert offset == 6 * rank and gathered.shape == (12, 4)
        loss = koleo_loss(features, candidates=gathered, offset=offset)
        loss.backward()
        reference_w = weight.clone().requires_grad_()
        reference = koleo_loss(inputs @ reference_w)
        reference.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / world, reference.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(ddp_grad(w), reference_w.grad, atol=1e-6, rtol=1e-5)
        # a gradient reaching other processes' rows only: without the all-reduce in backward it would be lost
        w.grad = None
        gathered, _ = all_gather_with_grad(inputs[local] @ w)
        (gathered[6 * (1 - rank):6 * (1 - rank) + 6] ** 2).sum().backward()
        expected = weight.clone().requires_grad_()
        ((inputs @ expected) ** 2).sum().backward()
        torch.testing.assert_close(ddp_grad(w), expected.grad / world, atol=1e-5, rtol=1e-5)

        # SyncBatchNorm: per-sample loss after BN over the global batch == one process's BatchNorm1d on the whole batch
        torch.manual_seed(1)
        reference_net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        net = convert_sync_batchnorm(copy.deepcopy(reference_net))
        assert type(net[1]).__name__ == "SyncBatchNorm"
        targets = torch.randn(12, 1)
        ((net(inputs[local]) - targets[local]) ** 2).mean().backward()
        ((reference_net(inputs) - targets) ** 2).mean().backward()
        for p, q in zip(net.parameters(), reference_net.parameters()):
            torch.testing.assert_close(ddp_grad(p), q.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(net[1].running_mean, reference_net[1].running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(net[1].running_var, reference_net[1].running_var, atol=1e-6, rtol=1e-6)
        net.eval()  # eval: running statistics, no communication
        torch.testing.assert_close(net(inputs[local]), reference_net.eval()(inputs[local]), atol=1e-6, rtol=1e-6)
        _check_float64_sync_batchnorm(rank, ddp_grad)
        _check_moco_v3_step_under_ddp(rank, world, one_process)

        # MoCo v3 negatives: keys gathered (no gradient), labels offset by the rows of the lower ranks
        torch.manual_seed(2)
        q1, q2, k1, k2 = torch.randn(4, 12, 8).unbind(0)
        keys_1, offset = all_gather_with_offset(k1[local])
        keys_2, _ = all_gather_with_offset(k2[local])
        v3 = moco_v3_loss(q1[local], q2[local], keys_1, keys_2, 0.2, label_offset=offset)
        dist.all_reduce(v3)
        torch.testing.assert_close(v3 / world, moco_v3_loss(q1, q2, k1, k2, 0.2), atol=1e-6, rtol=1e-6)

        # uneven batches (bad images skipped): rank 0 holds 3 rows, rank 1 holds 2
        rows = torch.arange(5.0).view(5, 1)
        mine = rows[:3] if rank == 0 else rows[3:]
        gathered, offset = all_gather_with_offset(mine)
        assert torch.equal(gathered, rows) and offset == (0 if rank == 0 else 3)
        assert torch.equal(all_gather(mine), rows)

        # shuffle-BN: the key encoder sees a mix of both processes' images, and unshuffling restores the rows
        torch.manual_seed(3 + rank)  # the permutation comes from rank 0 whatever the other ranks' RNG
        images = torch.arange(16.0).view(8, 2)[4 * rank:4 * rank + 4]
        shuffled, unshuffle = batch_shuffle(images)
        assert shuffled.shape == images.shape
        moved = torch.tensor([int(((shuffled[:, 0] >= 8).long() != rank).any())])
        dist.all_reduce(moved)
        assert moved.item() >= 1  # rows moved between the processes
        assert torch.equal(all_gather(shuffled)[:, 0].sort().values, torch.arange(0.0, 16.0, 2.0))
        assert torch.equal(batch_unshuffle(shuffled * 10, unshuffle), images * 10)
    finally:
        dist.destroy_process_group()


def _check_float64_sync_batchnorm(rank: int, ddp_grad) -> None:
    """SyncBatchNorm computes float64 inputs in float64 (it used to normalise in float32 whatever the input): output,
    gradients and running statistics equal BatchNorm2d's on the whole batch to float64 rounding."""
    from modeling.distributed import convert_sync_batchnorm

    torch.manual_seed(4)
    images, targets = torch.randn(2, 8, 3, 5, 5, dtype=torch.float64).unbind(0)
    reference = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1.0, 1.0)
    sync = convert_sync_batchnorm(copy.deepcopy(reference))
    local = slice(4 * rank, 4 * rank + 4)
    out = sync(images[local])
    assert out.dtype == torch.float64
    ((out - targets[local]) ** 2).mean().backward()
    expected = reference(images)
    ((expected - targets) ** 2).mean().backward()
    torch.testing.assert_close(out, expected[local], atol=1e-14, rtol=1e-13)
    for p, q in zip(sync.parameters(), reference.parameters()):
        torch.testing.assert_close(ddp_grad(p), q.grad, atol=1e-14, rtol=1e-12)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(sync, name), getattr(reference, name), atol=1e-14, rtol=1e-13)


def _tiny_moco_v3_and_views():
    """The same tiny MoCo v3 model (BatchNorm in backbone, projector and predictor) and 2 x 8 images on every
    process."""
    from modeling import MocoConfig, MocoForPreTraining

    torch.manual_seed(5)
    config = MocoConfig(backbone_config={"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16],
                                         "depths": [1, 1], "layer_type": "basic"},
                        projector_config={"in_dim": 16, "hidden_dim": 16, "out_dim": 8, "num_layers": 3,
                                          "norm": "batchnorm", "last_norm": True},
                        predictor_config={"hidden_dim": 16}, version=3, contrastive_temperature=1.0)
    return MocoForPreTraining(config).train(), torch.randn(2, 8, 3, 16, 16).unbind(0)


def _moco_v3_one_process_step() -> dict:
    """Loss, gradients and buffers of one float64 MoCo v3 step of one process on all 8 images. Computed before the
    process group exists: inside one, the collectives (shuffle-BN, key gathering) would mix the processes."""
    initial, (view_1, view_2) = _tiny_moco_v3_and_views()
    model = initial.double()
    loss = model(view_1=view_1.double(), view_2=view_2.double()).loss
    loss.backward()
    return {"loss": loss.detach(), "buffers": dict(model.named_buffers()),
            "grads": {name: p.grad for name, p in model.named_parameters()}}


def _check_moco_v3_step_under_ddp(rank: int, world: int, one_process: dict) -> None:
    """One MoCo v3 step under real DDP, 2 processes x 4 images (SyncBatchNorm in backbones, projectors and predictor,
    keys of the global batch, rank-offset labels) == one process x 8 images: the loss, every gradient after DDP's
    averaging, and every BatchNorm statistic (query and momentum encoder), in float64 to 1e-12. (In float32 the
    gradients differ by rounding, up to 3e-5 here; see test_two_processes_reproduce_one_process.)"""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from modeling.distributed import convert_sync_batchnorm

    initial, (view_1, view_2) = _tiny_moco_v3_and_views()
    local = slice(4 * rank, 4 * rank + 4)
    model = DistributedDataParallel(convert_sync_batchnorm(initial.double()))
    loss = model(view_1=view_1[local].double(), view_2=view_2[local].double()).loss
    loss.backward()  # DDP: every gradient is the mean over the processes
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world, one_process["loss"], atol=1e-12, rtol=0)
    for name, p in model.module.named_parameters():
        if one_process["grads"][name] is None:
            assert p.grad is None, name  # the momentum encoder
            continue
        torch.testing.assert_close(p.grad, one_process["grads"][name], atol=1e-12, rtol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name, b in model.module.named_buffers():
        torch.testing.assert_close(b, one_process["buffers"][name], atol=1e-12, rtol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_collectives_under_a_real_gloo_group():
    torch.multiprocessing.spawn(_collectives_worker, args=(2, free_port()), nprocs=2, join=True)


def test_collectives_are_no_ops_without_a_process_group():
    from modeling.distributed import (all_gather_with_grad, all_gather_with_offset, all_reduce_sum_with_grad,
                                      convert_sync_batchnorm, world_size)

    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) == (x, 0) and all_gather_with_offset(x) == (x, 0)
    assert all_reduce_sum_with_grad(x) is x and world_size() == 1
    reference = torch.nn.BatchNorm2d(3)
    converted = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))[0]
    images = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted(images), reference(images), atol=0, rtol=0)
    torch.testing.assert_close(converted.running_var, reference.running_var, atol=0, rtol=0)


# ------------------------------------------------------------------------- 2 processes vs 1 process


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _recipes(root: Path, dataset: Path, teacher: Path) -> dict[str, tuple[Path, list[str]]]:
    """variant -> (recipe, overrides) of the runs compared between 2 processes and 1 process: every variant of every
    registered method's tiny setting (tests/tiny_methods.py), in float64."""
    common = ["--max_steps", str(STEPS), "--total_train_batch_size", "16", "--do_eval", "false", "--dtype", "float64",
              "--checkpointing_steps", str(CHECKPOINT)]
    recipes = {}
    for variant in VARIANTS:
        path, overrides = write_tiny_recipe(variant, root, dataset, teacher)
        recipes[variant] = (path, overrides + common)
    return recipes


@pytest.fixture(scope="module")
def id_dataset(tmp_path_factory, tiny_dataset) -> Path:
    """The tiny dataset with an `id` column (the streaming test checks which samples each process saw)."""
    import datasets

    data = datasets.load_from_disk(str(tiny_dataset))
    path = tmp_path_factory.mktemp("id_dataset") / "data"
    datasets.DatasetDict({split: data[split].add_column("id", list(range(len(data[split])))) for split in data}
                         ).save_to_disk(str(path))
    return path


def _resumed_copy(run: Path, copy: Path) -> list[str]:
    """A copy of `run` to resume from its step-CHECKPOINT checkpoint: the overrides that do it."""
    import shutil

    shutil.copytree(run, copy)
    return ["--output_dir", str(copy), "--resume_from_checkpoint", str(copy / "checkpoints" / f"step_{CHECKPOINT}")]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_dataset, id_dataset, tiny_teacher) -> dict:
    """Every 2-process run of this module, in one `accelerate launch` with the shipped CPU config; first, the
    1-process runs whose checkpoints some of them resume."""
    root = tmp_path_factory.mktemp("two_processes")
    recipes = _recipes(root, tiny_dataset, tiny_teacher)
    runs, outputs = [], {}
    for name, (recipe, overrides) in recipes.items():
        outputs[f"{name}-1"] = root / f"{name}-1"
        train(load_recipe(recipe, overrides + ["--output_dir", str(outputs[f"{name}-1"])]))
    for name, (recipe, overrides) in recipes.items():
        outputs[name] = root / name
        runs.append({"args": ["train", str(recipe), *overrides, "--output_dir", str(root / name)]})
        outputs[f"{name}-1-then-2"] = root / f"{name}-1-then-2"
        runs.append({"args": ["train", str(recipe), *overrides,
                              *_resumed_copy(outputs[f"{name}-1"], outputs[f"{name}-1-then-2"])]})
    # MoCo v2 with per-process BatchNorm: shuffle-BN under real DDP
    outputs["moco-v2-shuffle-bn"] = root / "moco-v2-shuffle-bn"
    runs.append({"args": ["train", str(root / "moco-v2.yaml"), "--max_steps", "3", "--sync_batchnorm", "false",
                          "--do_eval", "false", "--output_dir", str(outputs["moco-v2-shuffle-bn"])]})
    # streaming: 48 images in 48 shards, 4 per process per step -> 6 steps per epoch; 2 epochs, checkpoint at 4
    streaming = _write(root / "streaming.yaml", TINY_RECIPE.format(output_dir=root / "streaming", dataset=id_dataset))
    stream_args = ["train", str(streaming), "--streaming", "true", "--max_steps", "12", "--checkpointing_steps", "4",
                   "--per_device_train_batch_size", "4", "--do_eval", "false"]
    outputs["streaming"], outputs["trace"] = root / "streaming", root / "trace"
    runs.append({"args": stream_args, "trace": str(root / "trace")})
    # ... then resumed from step 4 in the same directory (later steps move to metrics.superseded.jsonl)
    runs.append({"args": stream_args + ["--resume_from_checkpoint", str(root / "streaming" / "checkpoints" / "step_4")]})
    (root / "runs.json").write_text(json.dumps(runs))
    command = [str(Path(sys.executable).parent / "accelerate"), "launch",
               "--config_file", str(REPO_ROOT / "recipes" / "accelerate" / "cpu-2-process.yaml"),
               "--main_process_port", str(free_port()), str(REPO_ROOT / "tests" / "distributed_runs.py"),
               str(root / "runs.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=root,
                            env={**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                                 "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), ENV.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {"outputs": outputs, "recipes": recipes, "log": result.stderr}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_two_processes_reproduce_one_process(two_process_runs, name):
    """In float64 (recipe dtype: float64). In float32 the two runs differ by rounding (other summation orders), and
    where a ReLU input lies within that rounding of 0 the two runs pass or block that element's gradient: a
    discrete difference that training then amplifies. Measured on MoCo v3 in float32: the runs agree to 1e-7 until
    one ReLU input (exact value -7.5e-7) comes out +1.0e-6 under DDP at step 6 (-3.1e-6 on one process); the first
    BatchNorm's weight gradient then differs by 2.5e-3 (relative) and the loss by 2.9e-4 at step 10. In float64 the
    same runs end with parameters equal to 2e-16 (relative), so the losses agree to their logged (float32)
    precision."""
    outputs = two_process_runs["outputs"]
    two, one = losses(outputs[name]), losses(outputs[f"{name}-1"])
    config = json.loads((outputs[name] / "metrics.jsonl").read_text().splitlines()[-1])
    assert config["hardware"].startswith("2 process(es)") and config["global_batch_size"] == 16
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    worst = max(abs(one[s] - two[s]) for s in one)
    assert worst < TOLERANCE, {s: (one[s], two[s]) for s in one}


def _assert_resumed_steps_equal(resumed: dict[int, float], uninterrupted: dict[int, float]) -> None:
    """Steps after the checkpoint equal the uninterrupted run's to 1e-6 (relative: the float32 logging of a loss
    near 20 rounds to 2e-6)."""
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(CHECKPOINT + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-6), (step, resumed, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_checkpoint_written_on_one_process_resumes_on_two(two_process_runs, name):
    outputs = two_process_runs["outputs"]
    resumed = outputs[f"{name}-1-then-2"]
    config = json.loads((resumed / "metrics.jsonl").read_text().splitlines()[-1])
    assert config["hardware"].startswith("2 process(es)")
    assert json.loads((resumed / "checkpoints" / f"step_{STEPS}" / "batch_layout.json").read_text()) == {
        "num_processes": 2, "per_device": 8, "accumulation": 1, "streaming": False}
    _assert_resumed_steps_equal(losses(resumed), losses(outputs[name]))  # the 2-process uninterrupted run
    _assert_resumed_steps_equal(losses(resumed), losses(outputs[f"{name}-1"]))  # ... and the checkpoint's own run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_checkpoint_written_on_two_processes_resumes_on_one(two_process_runs, name, tmp_path):
    outputs = two_process_runs["outputs"]
    recipe, overrides = two_process_runs["recipes"][name]
    train(load_recipe(recipe, overrides + _resumed_copy(outputs[name], tmp_path / "resumed")))
    config = json.loads((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()[-1])
    assert config["hardware"].startswith("1 process(es)")
    _assert_resumed_steps_equal(losses(tmp_path / "resumed"), losses(outputs[f"{name}-1"]))
    _assert_resumed_steps_equal(losses(tmp_path / "resumed"), losses(outputs[name]))


@pytest.mark.slow
def test_moco_v2_with_shuffle_bn_trains_under_ddp(two_process_runs):
    run = two_process_runs["outputs"]["moco-v2-shuffle-bn"]
    curve = losses(run)
    assert sorted(curve) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in curve.values())


@pytest.mark.slow
def test_streaming_across_two_processes_sees_each_sample_once_per_epoch(two_process_runs):
    trace = two_process_runs["outputs"]["trace"]
    per_rank = [[json.loads(line) for line in Path(f"{trace}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert [len(batches) for batches in per_rank] == [12, 12]  # 12 steps x one batch of 4 per process
    for epoch in (0, 1):
        seen = [i for batches in per_rank for batch in batches[6 * epoch:6 * epoch + 6] for i in batch]
        assert sorted(seen) == list(range(48)), epoch  # every sample once, and no process saw another's
    first = [i for batch in per_rank[0][:6] for i in batch]
    second = [i for batch in per_rank[0][6:] for i in batch]
    assert first != second  # reshuffled per epoch


@pytest.mark.slow
def test_streaming_resume_gives_the_same_loss_curve(two_process_runs):
    run = two_process_runs["outputs"]["streaming"]
    resumed = losses(run)
    superseded = {}
    for line in (run / "metrics.superseded.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            superseded[record["step"]] = record["loss"]
    assert sorted(resumed) == list(range(1, 13)) and sorted(superseded) == list(range(5, 13))
    for step in range(5, 13):  # steps 5..12 of the uninterrupted run, then of the run resumed at step 4
        assert resumed[step] == pytest.approx(superseded[step], abs=1e-6), step
    assert json.loads((run / "checkpoints" / "step_8" / "data_state.json").read_text()) == {"epoch": 1, "batches": 2}


@pytest.mark.slow
def test_streaming_resume_on_another_process_count_is_refused(two_process_runs, tmp_path, capsys):
    from hf_ssl.cli import main as cli_main

    run = two_process_runs["outputs"]["streaming"]
    recipe = run.parent / "streaming.yaml"
    code = cli_main(["train", str(recipe), "--streaming", "true", "--max_steps", "12", "--per_device_train_batch_size",
                     "8", "--do_eval", "false", *_resumed_copy(run, tmp_path / "resumed")[:2],
                     "--resume_from_checkpoint", str(tmp_path / "resumed" / "checkpoints" / "step_4")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "it is a streaming run written on 2 process(es)" in err and "resume on 2 process(es)" in err, err
