"""Publishing: export, model card with eval results, push to a local fake Hub, load by name, feature extraction.

No network: the Hub is tests/fake_hub.py on 127.0.0.1. huggingface_hub reads HF_ENDPOINT at import, so loading
by name runs in subprocesses with HF_ENDPOINT set; in-process pushes patch `huggingface_hub.constants.ENDPOINT`.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_ssl import cli
from hf_ssl.hub import PLACEHOLDER, export_encoder, push_to_hub, render_model_card, write_model_card
from hf_ssl.recipe import load_recipe, save_recipe
from hf_ssl.train import build_model
from tests.conftest import TINY_RECIPE
from tests.fake_hub import FakeHub

SENTINEL = "hf_SENTINELtoken0123456789abcdef"  # the test token: must never be written anywhere

# eval_results.json in the schema of hf_ssl.evaluation: one object per (protocol, metric)
EVAL_RESULTS = [
    {"protocol": "knn", "metric": "top1", "value": 71.25, "dataset": "fashion_mnist", "dataset_config": None,
     "train_split": "train", "test_split": "test", "params": {"k": 20, "temperature": 0.07}, "seconds": 3.5},
    {"protocol": "knn", "metric": "top5", "value": 97.5, "dataset": "fashion_mnist", "dataset_config": None,
     "train_split": "train", "test_split": "test", "params": {"k": 20, "temperature": 0.07}, "seconds": 3.5},
    {"protocol": "linear", "metric": "top1", "value": 74.13, "dataset": "fashion_mnist", "dataset_config": None,
     "train_split": "train", "test_split": "test", "params": {"lr": 0.01, "weight_decay": 0.0}, "seconds": 9.0},
    {"protocol": "fewshot-finetune-1%", "metric": "top1", "value": 55.5, "dataset": "fashion_mnist",
     "dataset_config": None, "train_split": "train", "test_split": "test", "params": {"epochs": 60}, "seconds": 20.0},
    {"protocol": "fewshot-scratch-10%", "metric": "top1", "value": 61.0, "dataset": "fashion_mnist",
     "dataset_config": None, "train_split": "train", "test_split": "test", "params": {"epochs": 30}, "seconds": 20.0},
]
EXPECTED_METRICS = {"knn-top1": 71.25, "knn-top5": 97.5, "linear-top1": 74.13, "fewshot-finetune-1pct-top1": 55.5,
                    "fewshot-scratch-10pct-top1": 61.0}


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dataset) -> Path:
    """A run directory in the output-directory contract (config.yaml, metrics.jsonl, pretraining/, encoder/ with
    eval results in the evaluation's schema), made without the training loop so that these tests depend only on
    the model code and hub.py: the tiny recipe's DINO model, as built for training, stands for the trained one."""
    root = tmp_path_factory.mktemp("hub_run")
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(TINY_RECIPE.format(output_dir=root / "run", dataset=tiny_dataset))
    recipe = load_recipe(recipe_path, ["--max_steps", "2"])
    run = Path(recipe.output_dir)
    run.mkdir()
    save_recipe(recipe, run / "config.yaml")
    torch.manual_seed(0)
    build_model(recipe).save_pretrained(run / "pretraining", safe_serialization=True)
    records = [{"step": 1, "epoch": 0.17, "loss": 4.2, "lr": 1e-4}, {"step": 2, "epoch": 0.33, "loss": 4.1, "lr": 2e-4},
               {"step": 2, "train_runtime_seconds": 5.2, "hardware": "1 process(es) on CPU (2 cores)"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    export_encoder(run, run / "encoder")
    (run / "encoder" / "eval_results.json").write_text(json.dumps(EVAL_RESULTS, indent=2))
    write_model_card(run / "encoder")
    return run


@pytest.fixture(scope="module")
def hub():
    with FakeHub(token=SENTINEL) as fake:
        yield fake


@pytest.fixture
def local_hub(hub, monkeypatch, tmp_path):
    """In-process huggingface_hub pointed at the fake Hub, with the sentinel token in HF_TOKEN."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_file"))
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    return hub


def hub_env(hub: FakeHub, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=SENTINEL, HF_HOME=str(home), NO_COLOR="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    return env


def hub_state(hub: FakeHub) -> dict:
    return {repo_id: dict(repo.branches) for repo_id, repo in hub.repos.items()}


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def save_test_images(tiny_dataset, directory: Path, n: int = 4) -> list[Path]:
    import datasets

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(datasets.load_from_disk(str(tiny_dataset))["test"].select(range(n))):
        paths.append(directory / f"img{i}.png")
        row["image"].save(paths[-1])
    return paths


def local_features(model_dir: Path, paths: list[Path]) -> torch.Tensor:
    """The encoder's pooled feature of the images, through its own image processor (no Hub involved)."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from modeling.backbones import pooled_features

    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    pixels = processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return pooled_features(model, pixels)


# ------------------------------------------------------------------------------- push -> load by name -> pipeline


LOAD_FROM_HUB = r"""
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline
repo, dataset, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
images = [Image.open(p) for p in paths]
extractor = pipeline("image-feature-extraction", model=repo)
piped = [np.asarray(extractor(image, pool=True)).reshape(-1).tolist() for image in images]
model = AutoModel.from_pretrained(repo).eval()
processor = AutoImageProcessor.from_pretrained(repo)
pixels = processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
with torch.no_grad():
    direct = model(pixel_values=pixels).pooler_output.flatten(1).tolist()
loaded_without_hf_ssl = "hf_ssl" not in sys.modules and "modeling" not in sys.modules
import modeling  # the card's recipe for the pretraining model
from modeling.backbones import pooled_features
pretraining = AutoModel.from_pretrained(repo, subfolder="pretraining").eval()
with torch.no_grad():
    teacher = pooled_features(pretraining.get_encoder(), pixels).tolist()
from hf_ssl.features import extract_dataset_features  # hf-ssl features --model REPO
summary = extract_dataset_features(repo, dataset, "features.npy", split="test", batch_size=3)
print(json.dumps({"pipeline": piped, "direct": direct, "teacher": teacher, "type": type(pretraining).__name__,
                  "without_hf_ssl": loaded_without_hf_ssl, "dataset_features": np.load("features.npy").tolist()}))
"""


@pytest.mark.slow
def test_push_then_load_by_name_gives_the_local_features(run_dir, hub, tiny_dataset, tmp_path):
    home = tmp_path / "hf_home"
    env = hub_env(hub, home)
    pushed = subprocess.run([sys.executable, "-m", "hf_ssl", "push", run_dir / "encoder", "--repo_id", "user/dino-tiny",
                             "--include_pretraining"], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    result = json.loads(pushed.stdout.strip().splitlines()[-1])
    assert result["repo_id"] == "user/dino-tiny" and result["card"] == "uploaded"

    # one atomic commit on top of the repo's initial commit, with everything in it, no pickles
    history = hub.history("user/dino-tiny")
    assert len(history) == 2 and history[0].oid == result["commit_oid"]
    files = hub.files("user/dino-tiny")
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "hf_ssl.json",
            "eval_results.json", "loss.png", "pretraining/config.json", "pretraining/model.safetensors"} <= files.keys()
    assert not [p for p in files if p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert files["loss.png"].startswith(b"\x89PNG")
    assert files["model.safetensors"] == (run_dir / "encoder" / "model.safetensors").read_bytes()

    # the card: metadata parses and holds every eval result as its own metric; snippets name the repo
    from huggingface_hub import ModelCard

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert {"self-supervised", "dino"} <= set(card.data.tags) and card.data.license
    assert card.data.datasets is None  # trained on a local dataset: no Hub dataset id to name
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == EXPECTED_METRICS
    assert {r.dataset_type for r in card.data.eval_results} == {"zalando-datasets/fashion_mnist"}
    assert 'from_pretrained("user/dino-tiny")' in card.text and PLACEHOLDER not in card.text
    assert 'from_pretrained("user/dino-tiny", subfolder="pretraining")' in card.text
    assert "pool=True" in card.text and "![training loss](loss.png)" in card.text
    assert "Caron" in card.text and "@inproceedings{caron2021emerging" in card.text
    assert "| kNN | zalando-datasets/fashion_mnist | train → test | 71.25 | 97.50 |" in card.text

    # load by name in a fresh process: pipeline == AutoModel == the local encoder == the pretraining teacher
    images = save_test_images(tiny_dataset, tmp_path / "images")
    loaded = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, "user/dino-tiny", tiny_dataset,
                             *map(str, images)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    got = json.loads(loaded.stdout.strip().splitlines()[-1])
    expected = local_features(run_dir / "encoder", images)
    assert got["without_hf_ssl"] and got["type"] == "DinoForPreTraining"
    for key in ("pipeline", "direct", "teacher"):
        torch.testing.assert_close(torch.tensor(got[key]), expected, atol=1e-5, rtol=0, msg=key)
    # the images are the first test rows, saved losslessly: `features` from the Hub gives the same rows
    torch.testing.assert_close(torch.tensor(got["dataset_features"])[:len(images)], expected, atol=1e-5, rtol=0)
    assert not hub.unhandled, hub.unhandled

    # the token authorised the writes, and was written nowhere: not in logs, files, the cache, the Hub's content
    assert hub.authorized_writes >= 3
    for stream in (pushed.stdout, pushed.stderr, loaded.stdout, loaded.stderr):
        assert SENTINEL not in stream
    for root in (tmp_path, run_dir):
        for path in root.rglob("*"):
            if path.is_file():
                assert SENTINEL.encode() not in path.read_bytes(), path
    for commit in hub.repos["user/dino-tiny"].commits.values():
        assert SENTINEL not in commit.message
        assert all(SENTINEL.encode() not in data for data in commit.files.values())


# ------------------------------------------------------------------------------------------- card on the Hub


def test_second_push_keeps_the_hubs_card_unless_overwrite_card(run_dir, local_hub):
    hub = local_hub
    first = push_to_hub(run_dir / "encoder", "user/keep-card")
    assert first.card == "uploaded" and "pretraining/model.safetensors" not in first.files
    edited = hub.files("user/keep-card")["README.md"].decode().replace("## Limitations", "## Edited on the Hub\n\n"
                                                                        "by hand\n\n## Limitations")
    hub.commit_directly("user/keep-card", {"README.md": edited.encode()})

    second = push_to_hub(run_dir / "encoder", "user/keep-card")
    assert second.card == "kept"
    files = hub.files("user/keep-card")
    assert files["README.md"].decode() == edited
    assert [p for p in files if p.lower().endswith(".md")] == ["README.md"]  # one card

    third = push_to_hub(run_dir / "encoder", "keep-card", overwrite_card=True,  # namespace from whoami
                        commit_message="refresh the card")
    assert third.card == "uploaded" and third.repo_id == "user/keep-card"
    files = hub.files("user/keep-card")
    assert "Edited on the Hub" not in files["README.md"].decode()
    assert files["README.md"].decode() == str(render_model_card(run_dir / "encoder", repo_id="user/keep-card",
                                                                pretraining=False))
    assert [p for p in files if p.lower().endswith(".md")] == ["README.md"]
    assert hub.history("user/keep-card")[0].message == "refresh the card"


def test_push_of_an_export_with_pretraining_to_a_branch(run_dir, local_hub, tmp_path, capsys):
    hub = local_hub
    code, out, err = run_main(capsys, "export", run_dir, "--output_dir", tmp_path / "exported",
                              "--include_pretraining")
    assert code == 0, err
    exported = tmp_path / "exported"
    readme = (exported / "README.md").read_text()
    assert f'from_pretrained("{PLACEHOLDER}")' in readme and "REPO_OR_PATH" not in readme
    assert (exported / "pretraining" / "model.safetensors").is_file() and (exported / "loss.png").is_file()
    assert not [p for p in exported.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not (exported / "eval_results.json").exists()  # results belong to the run's own encoder dir

    (exported / "features").mkdir()  # the evaluation's feature cache of this encoder: local state
    (exported / "features" / "test-0123.safetensors").write_bytes(b"cache")
    code, out, err = run_main(capsys, "push", exported, "--repo_id", "user/branchy", "--revision", "v1", "--private")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["skipped"] == ["features/"] and "features/" in err
    assert not [p for p in hub.files("user/branchy", "v1") if p.startswith("features")]
    assert hub.repos["user/branchy"].private
    assert set(hub.repos["user/branchy"].branches) == {"main", "v1"}
    assert "pretraining/model.safetensors" in hub.files("user/branchy", "v1")
    assert hub.files("user/branchy", "main").keys() == {".gitattributes"}  # main untouched
    assert 'subfolder="pretraining"' in hub.files("user/branchy", "v1")["README.md"].decode()


# ------------------------------------------------------------------------------------------------ clear errors


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["bad_repo_id", "missing_dir", "not_an_encoder", "unreachable", "no_token",
                                  "commit_refused", "no_pretraining", "pickle"])
def test_push_errors_are_clear_and_commit_nothing(case, run_dir, local_hub, tmp_path, capsys, monkeypatch):
    hub = local_hub
    push_to_hub(run_dir / "encoder", "user/errors")  # the repo exists with one real commit
    before, n_requests = hub_state(hub), len(hub.requests)
    folder, repo_id, extra = run_dir / "encoder", "user/errors", []
    if case == "bad_repo_id":
        repo_id, expected = "user/not a valid name!", "invalid repo id 'user/not a valid name!'"
    elif case == "missing_dir":
        folder, expected = tmp_path / "nowhere", f"{tmp_path / 'nowhere'} does not exist"
    elif case == "not_an_encoder":
        (tmp_path / "empty").mkdir()
        folder, expected = tmp_path / "empty", "is not an exported encoder directory"
    elif case == "unreachable":
        from huggingface_hub import constants

        url = f"http://127.0.0.1:{_closed_port()}"
        monkeypatch.setattr(constants, "ENDPOINT", url)
        expected = f"cannot reach the Hub at {url}"
    elif case == "no_token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        expected = "no Hugging Face token"
    elif case == "commit_refused":
        hub.fail_next_commit = True  # new files (the pretraining model), so a commit is really attempted
        extra, expected = ["--include_pretraining"], "answered 500"
    elif case == "no_pretraining":
        extra, expected = ["--pretraining_dir", tmp_path], "no pretraining model"
    else:
        folder = tmp_path / "encoder"
        shutil.copytree(run_dir / "encoder", folder)
        (folder / "pytorch_model.bin").write_bytes(b"pickle")
        expected = "refusing to publish pickle files"
    code, out, err = run_main(capsys, "push", folder, "--repo_id", repo_id, *extra)
    assert code == 2, (out, err)
    assert expected in err and "Traceback" not in err and SENTINEL not in err + out
    assert hub_state(hub) == before  # no commit, no new repo or branch
    if case != "commit_refused":
        assert len(hub.requests) == n_requests  # refused before talking to the Hub


# ------------------------------------------------------------------------------- push_to_hub from training


def history(hub: FakeHub, repo_id: str, branch: str = "main") -> list:
    """The commits of a branch, oldest first."""
    repo, commits, oid = hub.repos[repo_id], [], hub.repos[repo_id].branches[branch]
    while oid is not None:
        commits.append(repo.commits[oid])
        oid = repo.commits[oid].parent
    return commits[::-1]


def test_train_with_push_to_hub_every_save_pushes_each_checkpoint_then_the_final_encoder(
        tiny_recipe, local_hub, capsys, caplog):
    hub = local_hub
    code, out, err = run_main(capsys, "train", tiny_recipe, "--max_steps", "4", "--checkpointing_steps", "2",
                              "--push_to_hub", "true", "--hub_model_id", "tiny-dino", "--hub_strategy", "every_save")
    assert code == 0, err
    commits = history(hub, "user/tiny-dino")
    assert [c.message for c in commits] == ["initial commit", "Training in progress, step 2",
                                            "Training in progress, step 4", "End of training"]
    run = tiny_recipe.parent / "run"
    final = hub.files("user/tiny-dino")
    assert final["model.safetensors"] == (run / "encoder" / "model.safetensors").read_bytes()
    assert commits[1].files["model.safetensors"] != final["model.safetensors"]  # step 2's weights, then later ones
    card = final["README.md"].decode()
    assert "user/tiny-dino" in card and "knn-top1" in card  # the run's card, with its evaluation, replaced step 4's
    assert json.loads(out.strip().splitlines()[-1])["hub_commit_url"]
    written = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert SENTINEL.encode() not in written and SENTINEL not in out + err + caplog.text
    assert "hub_token" not in (run / "config.yaml").read_text()


@pytest.mark.parametrize("case, expected", [
    ("rejected_token", "rejected the credentials (401)"),
    ("no_token", "no Hugging Face token"),
    ("bad_repo_id", "push_to_hub: invalid repo id 'user/not a name!'"),
])
def test_a_push_that_cannot_work_is_refused_before_any_training_step(case, expected, tiny_recipe, local_hub, capsys,
                                                                     monkeypatch):
    repo_id = "user/not a name!" if case == "bad_repo_id" else "user/refused"
    if case == "rejected_token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrongtoken0123456789abcdefghij")
    elif case == "no_token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    before = hub_state(local_hub)
    code, out, err = run_main(capsys, "train", tiny_recipe, "--max_steps", "2", "--push_to_hub", "true",
                              "--hub_model_id", repo_id)
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err, err
    run = tiny_recipe.parent / "run"
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()  # no step was taken
    assert hub_state(local_hub) == before


# ------------------------------------------------------------------------------------------------- features


def test_features_cli_matches_the_pipeline(run_dir, tiny_dataset, tmp_path, capsys):
    import datasets
    import pyarrow.parquet as pq
    from transformers import pipeline

    encoder = run_dir / "encoder"
    code, out, err = run_main(capsys, "features", "--model", encoder, "--dataset", tiny_dataset, "--split", "test",
                              "--batch_size", "5", "--output", tmp_path / "f.parquet")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["num_images"] == 16 and summary["label_column"] == "label"
    table = pq.read_table(tmp_path / "f.parquet").to_pydict()
    test = datasets.load_from_disk(str(tiny_dataset))["test"]
    assert table["index"] == list(range(16)) and table["label"] == test["label"]
    features = np.array(table["feature"], dtype=np.float32)

    extractor = pipeline("image-feature-extraction", model=str(encoder))
    piped = np.stack([np.asarray(extractor(row["image"], pool=True), dtype=np.float32).reshape(-1) for row in test])
    assert features.shape == piped.shape == (16, summary["feature_dim"])
    np.testing.assert_allclose(features, piped, atol=1e-5, rtol=0)

    code, out, err = run_main(capsys, "features", "--model", encoder, "--dataset", tiny_dataset, "--split", "test",
                              "--output", tmp_path / "f.npy")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "f.npy", allow_pickle=False), features, atol=1e-6, rtol=0)


@pytest.mark.parametrize("args, expected", [
    (["--output", "feats.csv"], "--output must end in .parquet or .npy"),
    (["--model", "missing_encoder_dir"], "cannot load an encoder and image processor from 'missing_encoder_dir'"),
])
def test_features_errors_are_clear(args, expected, run_dir, tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    base = {"--model": str(run_dir / "encoder"), "--dataset": str(tiny_dataset), "--output": "feats.parquet"}
    base.update(dict(zip(args[::2], args[1::2])))
    code, out, err = run_main(capsys, "features", *[x for kv in base.items() for x in kv])
    assert code == 2 and expected in err and "Traceback" not in err
    assert not list(tmp_path.glob("feats*")) and not list(tmp_path.glob(".tmp_*"))


# ---------------------------------------------------------------------------------------------------- the card


def test_card_of_a_vit_started_from_a_hub_checkpoint(tmp_path):
    info = {"method": "dino", "backbone": "vit", "feature": "CLS token of last_hidden_state", "feature_dim": 384,
            "image_size": 224, "recipe": {"dataset_name": "fashion_mnist",
                                          "backbone_name_or_path": "facebook/dino-vits16",
                                          "per_device_train_batch_size": 64, "train_split": "train"},
            "training": {"steps": 100, "epochs": 1.0, "train_runtime_seconds": 7300.0, "hardware": "8 x H100",
                         "global_batch_size": 512}}
    (tmp_path / "hf_ssl.json").write_text(json.dumps(info))
    (tmp_path / "eval_results.json").write_text(json.dumps(
        [{**EVAL_RESULTS[0], "value": 10.0}, EVAL_RESULTS[0],  # a re-run: the latest value counts
         {"knn_top1": 1.0, "knn_k": 20}, {"protocol": "knn"},  # legacy / incomplete entries
         {**EVAL_RESULTS[2], "params": {"weighting": "exp(sim/T) | none"}}]))
    card = render_model_card(tmp_path, repo_id="org/vit")
    assert card.data.base_model == "facebook/dino-vits16"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    knn = [r for r in card.data.eval_results if r.metric_type == "knn-top1"]
    assert [r.metric_value for r in knn] == [71.25, 1.0]  # fashion_mnist result, and the legacy one (dataset unknown)
    assert "last_hidden_state[:, 0]" in card.text and "extractor(image)[0][0]" in card.text
    assert "pool=True)" not in card.text.replace("do not use pool=True", "")
    assert "2.03 h" in card.text and "8 x H100" in card.text
    assert "512 images per optimizer step (the global batch; a run resumes" in card.text  # elastic resume, stated
    assert "| 74.13 | – | weighting=exp(sim/T) \\| none |" in card.text  # a "|" does not break the table
    assert "pretraining/" not in card.text  # no pretraining model in this repo


def test_card_model_index_has_every_evaluation_the_evaluation_recorded(tmp_path):
    """eval_results.json written by hf_ssl.evaluation, read by the card: evaluations that differ only in the dataset
    config, or only in the train split, are two results in the model-index; a re-run replaces the earlier one."""
    import yaml

    from hf_ssl.evaluation import make_records, record_eval_results

    def knn(value, **changes):
        split = {"dataset_config": None, "train_split": "train", "test_split": "test", **changes}
        return make_records("knn", {"top1": value}, dataset="fashion_mnist", params={"k": 20}, seconds=1.0, **split)

    info = {"method": "dino", "backbone": "resnet", "feature": "pooler_output", "feature_dim": 16, "image_size": 32,
            "recipe": {"dataset_name": "fashion_mnist"}, "training": {}}
    (tmp_path / "hf_ssl.json").write_text(json.dumps(info))
    record_eval_results(tmp_path, knn(10.0))
    record_eval_results(tmp_path, knn(20.0, dataset_config="extra"))
    record_eval_results(tmp_path, knn(30.0, train_split="validation"))
    record_eval_results(tmp_path, knn(40.0))  # the first evaluation again: replaces 10.0
    assert len(json.loads((tmp_path / "eval_results.json").read_text())) == 3

    card = render_model_card(tmp_path, repo_id="org/model")
    metadata = yaml.safe_load(str(card).split("---")[1])
    (index,) = metadata["model-index"]
    metrics = [(result["dataset"].get("config"), result["dataset"]["split"], metric["type"],
                metric["args"]["train_split"], metric["value"])
               for result in index["results"] for metric in result["metrics"]]
    assert sorted(metrics, key=str) == [("extra", "test", "knn-top1", "train", 20.0),
                                        (None, "test", "knn-top1", "train", 40.0),
                                        (None, "test", "knn-top1", "validation", 30.0)]
    names = [metric["name"] for result in index["results"] for metric in result["metrics"]]
    assert len(set(names)) == 2 and "kNN top-1 accuracy (%), trained on validation" in names
    assert "10.00" not in card.text
    for row in ("| kNN | zalando-datasets/fashion_mnist | train → test | 40.00 |",
                "| kNN | zalando-datasets/fashion_mnist (extra) | train → test | 20.00 |",
                "| kNN | zalando-datasets/fashion_mnist | validation → test | 30.00 |"):
        assert row in card.text
