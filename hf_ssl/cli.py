"""`hf-ssl` command line (also `python -m hf_ssl`).

    hf-ssl methods
    hf-ssl train RECIPE.yaml [--key value ...]
    hf-ssl eval knn|linear|fewshot --model PATH_OR_REPO|raw-pixels --dataset NAME [--train_split train ...]
    hf-ssl plot OUTPUT_DIR [--attention IMAGE ...]
    hf-ssl export OUTPUT_DIR_OR_CHECKPOINT --output_dir DIR [--include_pretraining]
    hf-ssl push DIR --repo_id NAME [--private] [--revision BRANCH] [--commit_message MSG] [--overwrite_card]
                    [--include_pretraining] [--pretraining_dir PATH]
    hf-ssl features --model PATH_OR_REPO --dataset NAME --output FILE.parquet|FILE.npy [--split --batch_size ...]
"""
import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class CliError(Exception):
    pass


def _methods(_args) -> int:
    from modeling import METHODS

    for name, method in METHODS.items():
        recipes = sorted(str(p.relative_to(RECIPES.parent)) for p in (RECIPES / name).glob("*.yaml"))
        print(f"{name:10s} {method.paper}")
        for recipe in recipes:
            print(f"{'':10s} {recipe}")
    return 0


def _train(args, extra: list[str]) -> int:
    from .recipe import load_recipe
    from .train import train

    if args.help:
        print(train_help(args.recipe, extra))
        return 0
    if args.recipe is None:
        raise CliError("give a recipe: hf-ssl train RECIPE.yaml [--key value ...] (hf-ssl train --help lists the keys)")
    recipe = load_recipe(args.recipe, extra)
    results = train(recipe)
    print(json.dumps(results))
    return 0


def _eval(args) -> int:
    import torch

    from .evaluation import fewshot_evaluate, knn_evaluate, linear_probe_evaluate, record_eval_results

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(train_split=args.train_split, test_split=args.test_split, dataset_config=args.dataset_config,
                  image_column=args.image_column, label_column=args.label_column, batch_size=args.batch_size,
                  num_workers=args.num_workers, device=device, image_size=args.image_size,
                  image_mean=args.image_mean, image_std=args.image_std)
    if args.protocol in ("knn", "linear"):
        common.update(use_cache=not args.no_cache)
    if args.protocol == "knn":
        report = knn_evaluate(args.model, args.dataset, k=args.k, temperature=args.temperature, **common)
    elif args.protocol == "linear":
        sweep = {k: v for k, v in (("learning_rates", args.learning_rates), ("weight_decays", args.weight_decays))
                 if v}
        report = linear_probe_evaluate(args.model, args.dataset, epochs=args.epochs or 30,
                                       probe_batch_size=args.train_batch_size or 1024,
                                       val_fraction=args.val_fraction, seed=args.seed, **sweep, **common)
    else:
        report = fewshot_evaluate(args.model, args.dataset, fractions=args.fractions, epochs=args.epochs,
                                  lr=args.learning_rates[0] if args.learning_rates else 1e-3,
                                  weight_decay=args.weight_decays[0] if args.weight_decays else 0.05,
                                  train_batch_size=args.train_batch_size or 64, seed=args.seed,
                                  finetune=not args.no_finetune, scratch=not args.no_scratch, **common)
    if report["model_dir"] and not args.no_record:
        record_eval_results(report["model_dir"], report["records"])
    print(json.dumps(report))
    return 0


def _plot(args) -> int:
    from .plots import MissingDependencyError, PlotError, plot_attention, plot_run

    try:
        if args.attention:
            paths = [plot_attention(args.output_dir, args.attention)]
        else:
            paths = plot_run(args.output_dir, embedding_map=not args.no_embedding_map, max_points=args.max_points)
    except (MissingDependencyError, PlotError) as err:
        raise CliError(str(err)) from None
    for path in paths:
        print(path)
    return 0


def _export(args) -> int:
    from .hub import export_encoder

    print(export_encoder(args.source, args.output_dir, include_pretraining=args.include_pretraining))
    return 0


def _push(args) -> int:
    from .hub import push_to_hub

    result = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, overwrite_card=args.overwrite_card,
                         include_pretraining=args.include_pretraining, pretraining_dir=args.pretraining_dir)
    if result.card == "kept":
        print(f"kept the model card already on the Hub in {result.repo_id} (--overwrite_card replaces it)",
              file=sys.stderr)
    if result.skipped:
        print(f"not published (local state): {', '.join(result.skipped)}", file=sys.stderr)
    print(json.dumps(result.to_dict()))
    return 0


def _features(args) -> int:
    from .features import extract_dataset_features, output_format

    output_format(args.output)  # an unsupported extension fails before anything is loaded
    summary = extract_dataset_features(args.model, args.dataset, args.output, split=args.split,
                                       dataset_config=args.dataset_config, image_column=args.image_column,
                                       label_column=args.label_column, batch_size=args.batch_size,
                                       num_workers=args.num_workers, device=args.device)
    print(json.dumps(summary))
    return 0


def train_help(recipe: str | None, overrides: list[str]) -> str:
    """HfArgumentParser-style help of every recipe key: the shared ones, and with a recipe its method's `model:` and
    `augmentation:` keys, each with type, default and help (and the recipe's value where it sets another)."""
    import dataclasses

    from .recipe import KeySection, method_key_docs, read_recipe_data, shared_key_docs

    data = read_recipe_data(recipe, overrides) if recipe else {}
    sections = [KeySection("shared recipe keys (hf_ssl.recipe.PretrainingRecipe)", None, shared_key_docs(data))]
    if recipe and "method" in data:
        sections += method_key_docs(data["method"], data)
    parser = argparse.ArgumentParser(
        prog="hf-ssl train", usage="hf-ssl train RECIPE.yaml [--key value ...] [--model.a.b value ...]",
        description="Pretrain from a YAML recipe; any key below can be overridden with --key value (the value is "
        "read as YAML; nested keys with dots)." + ("" if recipe else " With a recipe, --help also lists its "
                                                   "method's model: and augmentation: keys."),
        formatter_class=_KeyHelpFormatter)
    parser.add_argument("recipe", help="a YAML recipe, e.g. recipes/dino/fashion-mnist-resnet-tiny.yaml")
    for section in sections:
        group = parser.add_argument_group(section.title, section.description)
        for key in section.keys:
            default = "required" if key.default is dataclasses.MISSING else f"default: {_yaml_text(key.default)}"
            given = "" if key.value is dataclasses.MISSING else f"; {Path(recipe).name}: {_yaml_text(key.value)}"
            group.add_argument(f"--{key.name}", metavar=_metavar(key.type),
                               help=f"{key.help} ({default}{given})".strip().replace("%", "%%"))
    return parser.format_help()


class _KeyHelpFormatter(argparse.HelpFormatter):
    def _split_lines(self, text, width):  # as argparse's, without breaking file and key names at their hyphens
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def _yaml_text(value) -> str:
    """A value as a recipe writes it: null, false, [0.4, 1.0]."""
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


def _metavar(type_name: str) -> str:
    """`float | None` -> FLOAT, `tuple[float, float]` -> [FLOAT,FLOAT], `dict` -> DICT."""
    name = type_name.replace(" | None", "").replace("None | ", "").replace(" ", "").upper() or "VALUE"
    return re.sub(r"^(?:TUPLE|LIST)\[(.*)\]$", r"[\1]", name)


def one_line(err: Exception) -> str:
    """The error's own message. A DataLoader worker's exception is re-raised in the main process with the
    worker's traceback in its message; its last line is the original `module.Error: message`."""
    message = str(err)
    if "\nOriginal Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ssl", description="Self-supervised pretraining of image encoders "
                                     "for the Hugging Face ecosystem.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list methods and their recipes")
    # Its --help lists every recipe key (train_help): the keys are not argparse options, so that overrides stay YAML
    # typed and nested keys work.
    train = sub.add_parser("train", add_help=False, help="pretrain from a YAML recipe; any recipe key can be "
                           "overridden with --key value (nested: --model.head_config.out_dim 4096)")
    train.add_argument("recipe", nargs="?", help="a YAML recipe, e.g. recipes/dino/fashion-mnist-resnet-tiny.yaml")
    train.add_argument("-h", "--help", action="store_true")
    ev = sub.add_parser("eval", help="evaluate an encoder (knn / linear probe on frozen features, low-label "
                        "fine-tuning); prints one JSON object and appends its records to the model dir's "
                        "eval_results.json")
    ev.add_argument("protocol", choices=["knn", "linear", "fewshot"])
    ev.add_argument("--model", required=True, help="an encoder directory, a training OUTPUT_DIR, a Hub repo id, "
                    "or raw-pixels (the normalised pixels, flattened: a baseline)")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--dataset_config", default=None)
    ev.add_argument("--train_split", default="train")
    ev.add_argument("--test_split", default="test")
    ev.add_argument("--image_column", default=None)
    ev.add_argument("--label_column", default=None)
    ev.add_argument("--batch_size", type=int, default=256, help="feature-extraction / test batch size")
    ev.add_argument("--num_workers", type=int, default=2, help="image-decoding DataLoader workers")
    ev.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    ev.add_argument("--image_size", type=int, default=None, help="override the image processor's size "
                    "(raw-pixels: default 32)")
    ev.add_argument("--image_mean", type=float, nargs=3, default=None, help="override (raw-pixels: 0.5 0.5 0.5)")
    ev.add_argument("--image_std", type=float, nargs=3, default=None, help="override (raw-pixels: 0.5 0.5 0.5)")
    ev.add_argument("--no_cache", action="store_true", help="do not read or write cached features")
    ev.add_argument("--no_record", action="store_true", help="do not append to eval_results.json")
    ev.add_argument("--seed", type=int, default=0, help="linear: validation split; fewshot: label subsets, init")
    knn = ev.add_argument_group("knn")
    knn.add_argument("--k", type=int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    lin = ev.add_argument_group("linear / fewshot")
    lin.add_argument("--epochs", type=int, default=None, help="linear: 30; fewshot: 60 for <= 1%% of the labels, "
                     "30 above")
    lin.add_argument("--train_batch_size", type=int, default=None, help="linear: 1024; fewshot: 64")
    lin.add_argument("--learning_rates", type=float, nargs="+", default=None,
                     help="linear: the lr sweep (default 1e-3 1e-2 1e-1); fewshot: the first one (default 1e-3)")
    lin.add_argument("--weight_decays", type=float, nargs="+", default=None,
                     help="linear: the weight-decay sweep (default 0 0.1); fewshot: the first one (default 0.05)")
    lin.add_argument("--val_fraction", type=float, default=0.1, help="linear: held-out part of train for the sweep")
    lin.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1], help="fewshot: label fractions")
    lin.add_argument("--no_finetune", action="store_true", help="fewshot: skip fine-tuning the encoder")
    lin.add_argument("--no_scratch", action="store_true", help="fewshot: skip the from-scratch baseline")
    pl = sub.add_parser("plot", help="redraw OUTPUT_DIR/plots/*.png (loss, lr, kNN curves; t-SNE map of the "
                        "eval-split features coloured by label)")
    pl.add_argument("output_dir")
    pl.add_argument("--max_points", type=int, default=1000, help="points in the embedding map")
    pl.add_argument("--no_embedding_map", action="store_true")
    pl.add_argument("--attention", nargs="+", metavar="IMAGE", help="instead: the last layer's CLS self-attention of "
                    "each head over these images (ViT encoders), as plots/attention.png, also put in the encoder's "
                    "model card")
    ex = sub.add_parser("export", help="export a run's encoder as a plain transformers model")
    ex.add_argument("source", help="a training OUTPUT_DIR or one of its checkpoints/step_N")
    ex.add_argument("--output_dir", required=True)
    ex.add_argument("--include_pretraining", action="store_true", help="also save the full XForPreTraining "
                    "(config + safetensors) in DIR/pretraining/, which push publishes")
    pu = sub.add_parser("push", help="publish an exported encoder to the Hub in one commit (creates the repo; "
                        "keeps the Hub's README.md unless --overwrite_card); the token comes from HF_TOKEN or "
                        "`hf auth login`")
    pu.add_argument("folder", help="an exported encoder directory (OUTPUT_DIR/encoder or hf-ssl export's "
                    "--output_dir), or a training OUTPUT_DIR")
    pu.add_argument("--repo_id", required=True, help="NAMESPACE/NAME, or NAME for your own namespace")
    pu.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                    "its visibility)")
    pu.add_argument("--revision", default=None, help="branch to commit to (created if needed; default main)")
    pu.add_argument("--commit_message", default=None)
    pu.add_argument("--overwrite_card", action="store_true", help="replace a README.md already on the Hub")
    pu.add_argument("--include_pretraining", action="store_true", help="also publish the pretraining model "
                    "in the repo's pretraining/ folder: FOLDER/pretraining (from export --include_pretraining), "
                    "else the sibling FOLDER/../pretraining of OUTPUT_DIR/encoder")
    pu.add_argument("--pretraining_dir", default=None, help="the pretraining model to publish (implies "
                    "--include_pretraining)")
    fe = sub.add_parser("features", help="pooled features of every image of a dataset split, through the "
                        "encoder's image processor as in pipeline('image-feature-extraction')")
    fe.add_argument("--model", required=True, help="an encoder directory or Hub repo id")
    fe.add_argument("--dataset", required=True)
    fe.add_argument("--output", required=True, help="FILE.parquet (index, label, feature per row) or FILE.npy "
                    "([N, dim] float32)")
    fe.add_argument("--split", default="train")
    fe.add_argument("--dataset_config", default=None)
    fe.add_argument("--image_column", default=None)
    fe.add_argument("--label_column", default=None, help="default: the first ClassLabel column or 'label', "
                    "if any")
    fe.add_argument("--batch_size", type=int, default=64)
    fe.add_argument("--num_workers", type=int, default=0, help="image-decoding DataLoader workers")
    fe.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .evaluation import EvaluationError
    from .features import FeaturesError
    from .hub import ExportError, HubError
    from .recipe import RecipeError
    from .train import TrainingError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args, extra)
        return {"methods": _methods, "eval": _eval, "export": _export, "push": _push, "features": _features,
                "plot": _plot}[args.command](args)
    except (CliError, DataError, EvaluationError, ExportError, FeaturesError, HubError, RecipeError,
            TrainingError) as err:
        print(f"hf-ssl {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
