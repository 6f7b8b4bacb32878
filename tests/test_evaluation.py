"""Evaluation suite: kNN, linear probe, low-label subsets and fine-tuning, metric scripts, eval_results.json,
online kNN during training, plots, `hf-ssl eval` / `hf-ssl plot`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_ssl import evaluation as ev

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
TINY_BACKBONE = dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")


def save_tiny_encoder(path: Path, seed: int = 0) -> Path:
    from transformers import AutoConfig

    from hf_ssl.hub import image_processor
    from modeling.backbones import build_backbone

    torch.manual_seed(seed)
    build_backbone(AutoConfig.for_model(**TINY_BACKBONE)).save_pretrained(path, safe_serialization=True)
    image_processor(32, [0.5] * 3, [0.5] * 3).save_pretrained(path)
    return path


@pytest.fixture
def tiny_encoder(tmp_path) -> Path:
    return save_tiny_encoder(tmp_path / "encoder")


# ------------------------------------------------------------------------------------------------ kNN


def test_knn_on_hand_made_features_gives_the_known_votes():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0, 0.6, -1: the 3 nearest are samples 0, 2, 1
    sharp = ev.knn_predict(train, labels, query, k=3, temperature=0.5, num_classes=3)
    torch.testing.assert_close(sharp, torch.tensor([[math.exp(2.0), math.exp(1.2) + 1.0, 0.0]]))
    assert sharp.argmax(1).item() == 0  # one very close neighbour outvotes two farther ones ...
    flat = ev.knn_predict(train, labels, query, k=3, temperature=5.0, num_classes=3)
    torch.testing.assert_close(flat, torch.tensor([[math.exp(0.2), math.exp(0.12) + 1.0, 0.0]]))
    assert flat.argmax(1).item() == 1  # ... unless the temperature flattens the weights
    assert ev.knn_predict(train, labels, query, k=1, temperature=0.07, num_classes=3).argmax(1).item() == 0


def test_knn_equals_an_independent_implementation_on_random_features():
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(150, 16, generator=g), dim=1)
    test = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    labels = torch.randint(0, 7, (150,), generator=g)
    k, t = 20, 0.07
    expected = torch.zeros(40, 7, dtype=torch.float64)
    for i, q in enumerate(test.double().tolist()):
        sims = sorted(((sum(a * b for a, b in zip(q, x)), int(y)) for x, y in
                       zip(train.double().tolist(), labels)), reverse=True)[:k]
        for s, y in sims:
            expected[i, y] += math.exp(s / t)
    got = ev.knn_predict(train, labels, test, k=k, temperature=t, num_classes=7, chunk_size=9)  # several chunks
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_classification_metrics_top1_and_top5():
    scores = torch.zeros(4, 8)
    scores[0, 3] = 1  # right
    scores[1, 2] = 1  # wrong; truth is ranked 2nd
    scores[1, 5] = 0.5
    scores[2] = torch.arange(8.0)  # truth 0 ranked last
    scores[3] = -torch.arange(8.0)  # truth 4 ranked 5th
    metrics = ev.classification_metrics(scores, torch.tensor([3, 5, 0, 4]))
    assert metrics == {"top1": 25.0, "top5": 75.0}
    assert ev.classification_metrics(scores[:, :5], torch.tensor([3, 2, 0, 4])).keys() == {"top1"}


# ------------------------------------------------------------------------------------------------ linear probe


def separable(n: int, dim: int, classes: int, seed: int):
    """Gaussian blobs around well-separated class means (pairwise ~7 noise std apart: linearly separable),
    then badly scaled and shifted, so that standardising matters."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = means[y] + torch.randn(n, dim, generator=g)
    return x * torch.logspace(-2, 1, dim) + 50.0, y


def test_linear_probe_reaches_95_percent_on_linearly_separable_features():
    train_x, train_y = separable(1200, 24, 6, seed=0)
    test_x, test_y = separable(300, 24, 6, seed=1)
    train_x[:, 0] = 3.0  # a constant feature must not break standardisation
    test_x[:, 0] = 3.0
    scores, params = ev.linear_probe(train_x, train_y, test_x, test_y, 6, epochs=10, batch_size=256,
                                     learning_rates=(1e-3, 1e-2), weight_decays=(0.0, 1e-2))
    assert scores["top1"] >= 95.0, (scores, params)
    assert len(params["sweep"]) == 4 and params["val_top1"] == max(s["val_top1"] for s in params["sweep"])
    assert (params["lr"], params["weight_decay"]) in {(s["lr"], s["weight_decay"]) for s in params["sweep"]}


# ------------------------------------------------------------------------------------------------ low-label


def test_low_label_subset_is_class_balanced_and_reproducible():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((500, 300, 200))])[torch.randperm(1000)]
    subset = ev.class_balanced_subset(labels, 0.1, seed=3)
    assert torch.bincount(labels[subset]).tolist() == [33, 33, 33]  # round(0.1 * 1000 / 3) each
    assert len(set(subset.tolist())) == 99 and torch.equal(subset, subset.sort().values)
    assert torch.equal(subset, ev.class_balanced_subset(labels.clone(), 0.1, seed=3))
    assert not torch.equal(subset, ev.class_balanced_subset(labels, 0.1, seed=4))
    assert torch.bincount(labels[ev.class_balanced_subset(labels, 0.01, seed=3)]).tolist() == [3, 3, 3]
    small = torch.tensor([0] * 50 + [1] * 2)
    assert torch.bincount(small[ev.class_balanced_subset(small, 0.2, seed=0)]).tolist() == [5, 2]
    with pytest.raises(ev.EvaluationError):
        ev.class_balanced_subset(labels, 0.0)
    assert ev.fraction_name(0.01) == "1%" and ev.fraction_name(0.1) == "10%" and ev.fraction_name(0.025) == "2.5%"


def test_fewshot_finetunes_and_trains_from_scratch_on_the_same_labels(tiny_encoder, tiny_dataset):
    from safetensors.torch import load_file

    before = load_file(tiny_encoder / "model.safetensors")
    report = ev.fewshot_evaluate(tiny_encoder, str(tiny_dataset), fractions=(0.25,), epochs=2, train_batch_size=4,
                                 num_workers=0, batch_size=16)
    protocols = {r["protocol"] for r in report["records"]}
    assert protocols == {"fewshot-finetune-25%", "fewshot-scratch-25%"}
    for r in report["records"]:
        assert r["metric"] == "top1" and 0 <= r["value"] <= 100  # 4 classes: no top-5
        assert r["params"]["num_labels"] == 12 and r["params"]["labels_per_class"] == 3
    assert {r["params"]["init"] for r in report["records"]} == {"pretrained encoder", "random (encoder config)"}
    after = load_file(tiny_encoder / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # fine-tuning worked on a copy
    with pytest.raises(ev.EvaluationError, match="raw-pixels"):
        ev.fewshot_evaluate(ev.RAW_PIXELS, str(tiny_dataset))


# ------------------------------------------------------------------------------------------------ metric scripts


def test_metric_scripts_load_by_path_offline(tmp_path):
    for script in ev.METRICS_DIR.glob("[!_]*.py"):
        for line in script.read_text().splitlines():
            if line.startswith("import "):  # evaluate reads these as dependencies: one module per line
                assert "," not in line, (script.name, line)
    code = f"""
import json, evaluate
acc = evaluate.load({str(ev.METRICS_DIR / 'accuracy.py')!r})
topk = evaluate.load({str(ev.METRICS_DIR / 'top_k_accuracy.py')!r})
print(json.dumps([acc.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]),
                  topk.compute(predictions=[[0, 1], [2, 1], [0, 2]], references=[1, 0, 0], k=2)]))
"""
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # a Hub that never answers
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy, top_k = json.loads(result.stdout.strip().splitlines()[-1])
    assert accuracy == {"accuracy": 0.75} and top_k == {"top_k_accuracy": pytest.approx(2 / 3)}


# ------------------------------------------------------------------------------------------------ results


def test_knn_results_land_in_eval_results_json_and_features_are_cached(tiny_encoder, tiny_dataset):
    report = ev.knn_evaluate(tiny_encoder, str(tiny_dataset), k=5, batch_size=16, num_workers=0)
    assert report["features_cached"] is False
    ev.record_eval_results(tiny_encoder, report["records"])
    records = json.loads((tiny_encoder / "eval_results.json").read_text())
    assert [r["metric"] for r in records] == ["top1"]  # 4 classes
    (record,) = records
    assert list(record) == list(ev.RECORD_KEYS)
    assert record["protocol"] == "knn" and isinstance(record["value"], float) and 0 <= record["value"] <= 100
    assert record["value"] == round(record["value"], 2) and record["value"] == report["scores"]["knn/top1"]
    assert record["dataset"] == str(tiny_dataset) and record["dataset_config"] is None
    assert (record["train_split"], record["test_split"]) == ("train", "test")
    assert record["params"]["k"] == 5 and record["params"]["temperature"] == 0.07
    assert isinstance(record["seconds"], float)

    cache = sorted((tiny_encoder / "features").glob("*.safetensors"))
    assert len(cache) == 2  # train and test
    again = ev.knn_evaluate(tiny_encoder, str(tiny_dataset), k=5, batch_size=16, num_workers=0)
    assert again["features_cached"] is True and again["scores"] == report["scores"]
    save_tiny_encoder(tiny_encoder, seed=1)  # a changed encoder: the cache must not be reused
    changed = ev.knn_evaluate(tiny_encoder, str(tiny_dataset), k=5, batch_size=16, num_workers=0)
    assert changed["features_cached"] is False
    assert len(list((tiny_encoder / "features").glob("*.safetensors"))) == 2  # stale files replaced
    assert sorted((tiny_encoder / "features").glob("*.safetensors")) != cache

    # appending: the same evaluation replaces, others are kept, entries of the first layout are converted
    path = tiny_encoder / "eval_results.json"
    path.write_text(json.dumps([{"knn_top1": 1.0}, *records]))
    other = dict(record, test_split="validation", value=12.5)
    ev.record_eval_results(tiny_encoder, changed["records"] + [other])
    final = json.loads(path.read_text())
    assert len(final) == 3 and final[1]["value"] == changed["scores"]["knn/top1"] and final[2] == other
    assert (final[0]["protocol"], final[0]["value"], final[0]["dataset"]) == ("knn", 1.0, "unknown")
    with pytest.raises(ev.EvaluationError):
        ev.record_eval_results(tiny_encoder, [dict(record, protocol="knn-20")])
    with pytest.raises(ev.EvaluationError):
        ev.record_eval_results(tiny_encoder, [{k: v for k, v in record.items() if k != "seconds"}])


def knn_record(value: float = 50.0, **changes) -> dict:
    (record,) = ev.make_records("knn", {"top1": value}, dataset="fashion_mnist", dataset_config=None,
                                train_split="train", test_split="test", params={"k": 20}, seconds=1.0)
    return {**record, **changes}


@pytest.mark.parametrize("changes", [
    {"dataset_config": "extra"}, {"train_split": "train[:50%]"}, {"test_split": "validation"},
    {"dataset": "other/dataset"}, {"metric": "top5"}, {"protocol": "linear"},
    {"protocol": "fewshot-finetune-10%"},  # vs fewshot-finetune-1%: the label fraction is part of the protocol
], ids=lambda changes: "-".join(map(str, changes.values())))
def test_eval_results_keep_evaluations_that_differ_in_one_identity_key(tmp_path, changes):
    base = knn_record(protocol="fewshot-finetune-1%") if "fewshot" in changes.get("protocol", "") else knn_record()
    ev.record_eval_results(tmp_path, [base])
    ev.record_eval_results(tmp_path, [{**base, **changes, "value": 60.0}])
    stored = json.loads((tmp_path / "eval_results.json").read_text())
    assert stored == [base, {**base, **changes, "value": 60.0}]

    # the same evaluation again (other value, settings, time) replaces the earlier record, moved to the end
    rerun = {**base, "value": 70.0, "params": {"k": 10}, "seconds": 2.0}
    ev.record_eval_results(tmp_path, [rerun])
    assert json.loads((tmp_path / "eval_results.json").read_text()) == [{**base, **changes, "value": 60.0}, rerun]


def test_the_schema_is_one_definition_shared_with_the_hub(tmp_path):
    from hf_ssl import eval_results, hub

    assert ev.RECORD_KEYS is eval_results.RECORD_KEYS
    assert eval_results.IDENTITY_KEYS == ("protocol", "metric", "dataset", "dataset_config", "train_split",
                                          "test_split")
    records = [knn_record(), knn_record(dataset_config="extra"), knn_record(train_split="validation"),
               knn_record(value=10.0, test_split="validation")]
    ev.record_eval_results(tmp_path, records)
    ev.record_eval_results(tmp_path, [knn_record(value=20.0, test_split="validation")])
    assert hub.load_eval_results(tmp_path) == json.loads((tmp_path / "eval_results.json").read_text()) \
        == records[:3] + [knn_record(value=20.0, test_split="validation")]


def test_raw_pixels_encoder_flattens_normalised_pixels(tiny_dataset):
    encoder = ev.load_encoder(ev.RAW_PIXELS)
    assert (encoder.image_size, encoder.image_mean, encoder.image_std) == (32, [0.5] * 3, [0.5] * 3)
    feats = ev.split_features(encoder, str(tiny_dataset), "test", batch_size=8, num_workers=0)
    assert feats.features.shape == (16, 3 * 32 * 32) and feats.path is None  # never cached
    assert feats.features.min() >= -1 and feats.features.max() <= 1
    assert feats.label_names == list("abcd")


# ------------------------------------------------------------------------------------------------ online kNN


def test_online_knn_restores_train_modes_and_rng(tiny_dataset):
    from transformers import AutoConfig

    from modeling.backbones import build_backbone

    encoder = build_backbone(AutoConfig.for_model(**TINY_BACKBONE)).train()
    encoder.embedder.eval()  # a submodule that was in eval mode stays so
    online = ev.OnlineKnn(str(tiny_dataset), "train", "test", 32, [0.5] * 3, [0.5] * 3, subset_size=20, k=5,
                          batch_size=8)
    rng = torch.get_rng_state()
    result = online(encoder)
    assert torch.equal(rng, torch.get_rng_state())
    assert encoder.training and not encoder.embedder.training and encoder.encoder.training
    assert (result["bank_size"], result["query_size"]) == (20, 16) and 0 <= result["top1"] <= 100
    assert online(encoder) == result  # the same subsets every time


def test_online_knn_appears_in_metrics_jsonl_and_plots(tiny_recipe, tiny_dataset, capsys):
    from hf_ssl.cli import main
    from hf_ssl.recipe import load_recipe
    from hf_ssl.train import train

    recipe = load_recipe(tiny_recipe, ["--eval_steps", "2", "--max_steps", "2", "--do_eval", "false"])
    train(recipe)
    run = Path(recipe.output_dir)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in records if "eval/knn_top1" in r]
    assert len(online) == 1 and online[0]["step"] == 2
    # the same number as a kNN of the exported (final) encoder on the same, here full, splits
    direct = ev.knn_evaluate(run / "encoder", str(tiny_dataset), batch_size=16, num_workers=0, use_cache=False)
    assert online[0]["eval/knn_top1"] == direct["scores"]["knn/top1"]
    assert (run / "plots" / "knn_top1.png").stat().st_size > 1000
    assert not (run / "plots" / "embedding_tsne.png").exists()  # no eval features yet (do_eval false)

    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(run / "plots" / "embedding_tsne.png") in printed and str(run / "plots" / "loss.png") in printed
    assert (run / "plots" / "embedding_tsne.png").stat().st_size > 1000
    assert main(["plot", str(run / "nope")]) == 2


def test_tsne_keeps_clusters_apart():
    from hf_ssl.plots import tsne

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    x = torch.randn(3, 20, generator=g)[labels] * 4 + torch.randn(60, 20, generator=g)
    y = tsne(x)
    d = torch.cdist(y, y).fill_diagonal_(float("inf"))
    assert y.shape == (60, 2) and (labels[d.argmin(1)] == labels).float().mean() >= 0.95
    # and not by chance: random labels are not kept apart
    shuffled = labels[torch.randperm(60, generator=g)]
    assert (shuffled[d.argmin(1)] == shuffled).float().mean() < 0.8


def test_tsne_without_scikit_learn_names_the_plots_extra(monkeypatch):
    import sys

    from hf_ssl.plots import MissingDependencyError, tsne

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r'pip install "hf-ssl\[plots\]"'):
        tsne(torch.randn(10, 4))


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_eval_linear_prints_one_json_object(tiny_encoder, tiny_dataset):
    result = subprocess.run([sys.executable, "-m", "hf_ssl", "eval", "linear", "--model", str(tiny_encoder),
                             "--dataset", str(tiny_dataset), "--epochs", "5", "--num_workers", "0",
                             "--batch_size", "16", "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["protocol"] == "linear" and 0 <= report["scores"]["linear/top1"] <= 100
    assert report["records"][0]["params"]["epochs"] == 5
    recorded = json.loads((tiny_encoder / "eval_results.json").read_text())
    assert [(r["protocol"], r["metric"]) for r in recorded] == [("linear", "top1")]
    assert recorded[0]["value"] == report["scores"]["linear/top1"]
