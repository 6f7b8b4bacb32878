"""Top-k accuracy: the fraction of samples whose reference label is among the k best-ranked predictions.

A local `evaluate` metric script; load it by path:

    evaluate.load("/abs/path/to/hf_ssl/metrics/top_k_accuracy.py")

Predictions are *ranked class ids* (best first, at least k of them per sample), not score matrices: this keeps
what goes through evaluate's Arrow cache small (k ints per sample instead of one float per class).
evaluate reads this file's import lines as its dependencies: keep one module per `import` line.
"""
import datasets
import evaluate

_DESCRIPTION = """
Top-k accuracy = (number of samples whose reference is among their first k ranked predictions) / (number of
samples), in [0, 1]. With k=1 it is the accuracy of the first-ranked prediction.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per sample, class ids ranked best first (at least `k` of them,
        e.g. `scores.topk(k).indices`).
    references (`list` of `int`): true class ids.
    k (`int`, defaults to 5): how many of the ranked predictions count.
Returns:
    top_k_accuracy (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_ssl/metrics/top_k_accuracy.py")
    >>> metric.compute(predictions=[[0, 1], [2, 1], [0, 2]], references=[1, 0, 0], k=2)
    {'top_k_accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=5):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if len(predictions) == 0:
            raise ValueError("top-k accuracy of an empty set of predictions is undefined")
        short = [i for i, ranked in enumerate(predictions) if len(ranked) < k]
        if short:
            raise ValueError(f"sample {short[0]} has {len(predictions[short[0]])} ranked predictions, fewer than k={k}")
        hits = sum(int(r) in {int(p) for p in ranked[:k]} for ranked, r in zip(predictions, references))
        return {"top_k_accuracy": hits / len(references)}
