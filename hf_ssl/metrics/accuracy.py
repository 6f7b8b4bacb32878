"""Accuracy: the fraction of predictions equal to their reference label.

A local `evaluate` metric script (the Hub's `accuracy` cannot be fetched offline); load it by path:

    evaluate.load("/abs/path/to/hf_ssl/metrics/accuracy.py")

evaluate reads this file's import lines as its dependencies: keep one module per `import` line.
"""
import datasets
import evaluate

_DESCRIPTION = """
Accuracy = (number of predictions equal to the reference) / (number of predictions), in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids.
    references (`list` of `int`): true class ids.
Returns:
    accuracy (`float`): fraction of correct predictions, in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_ssl/metrics/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("accuracy of an empty set of predictions is undefined")
        correct = sum(int(p) == int(r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
