"""`hf-ssl` command line (also `python -m hf_ssl`).

    hf-ssl methods
    hf-ssl train RECIPE.yaml [--key value ...]
    hf-ssl eval knn --model PATH_OR_REPO --dataset NAME [--train_split train --test_split test ...]
    hf-ssl export OUTPUT_DIR_OR_CHECKPOINT --output_dir DIR
"""
import argparse
import json
import sys
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

    recipe = load_recipe(args.recipe, extra)
    results = train(recipe)
    print(json.dumps(results))
    return 0


def _eval(args) -> int:
    from .evaluation import knn_evaluate, record_eval_result

    if args.protocol != "knn":
        raise CliError(f"eval protocol {args.protocol!r} is not available yet; available: knn")
    result = knn_evaluate(args.model, args.dataset, train_split=args.train_split, test_split=args.test_split,
                          dataset_config=args.dataset_config, image_column=args.image_column,
                          label_column=args.label_column, k=args.k, temperature=args.temperature,
                          batch_size=args.batch_size)
    if Path(args.model).is_dir():
        record_eval_result(Path(args.model), result)
    print(json.dumps(result))
    return 0


def _export(args) -> int:
    from .hub import export_encoder

    print(export_encoder(args.source, args.output_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-ssl", description="Self-supervised pretraining of image encoders "
                                     "for the Hugging Face ecosystem.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list methods and their recipes")
    train = sub.add_parser("train", help="pretrain from a YAML recipe; any recipe key can be overridden "
                           "with --key value (nested: --model.head_config.out_dim 4096)")
    train.add_argument("recipe", help="a YAML recipe, e.g. recipes/dino/fashion-mnist-resnet-tiny.yaml")
    ev = sub.add_parser("eval", help="evaluate frozen features; prints one JSON object")
    ev.add_argument("protocol", choices=["knn", "linear", "fewshot"])
    ev.add_argument("--model", required=True, help="an encoder directory or Hub repo id")
    ev.add_argument("--dataset", required=True)
    ev.add_argument("--dataset_config", default=None)
    ev.add_argument("--train_split", default="train")
    ev.add_argument("--test_split", default="test")
    ev.add_argument("--image_column", default=None)
    ev.add_argument("--label_column", default=None)
    ev.add_argument("--k", type=int, default=20)
    ev.add_argument("--temperature", type=float, default=0.07)
    ev.add_argument("--batch_size", type=int, default=256)
    ex = sub.add_parser("export", help="export a run's encoder as a plain transformers model")
    ex.add_argument("source", help="a training OUTPUT_DIR or one of its checkpoints/step_N")
    ex.add_argument("--output_dir", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .hub import ExportError
    from .recipe import RecipeError
    from .train import TrainingError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args, extra)
        return {"methods": _methods, "eval": _eval, "export": _export}[args.command](args)
    except (CliError, DataError, ExportError, RecipeError, TrainingError) as err:
        print(f"hf-ssl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
