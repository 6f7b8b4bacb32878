"""Several `hf-ssl train` runs in one `accelerate launch` (tests/test_distributed.py): process start-up is the
expensive part of a 2-process test, so the processes are started once and train every recipe in turn through the
real CLI entry point (`hf_ssl.cli.main`), on the one process group.

    accelerate launch ... tests/distributed_runs.py RUNS.json

RUNS.json: a list of `{"args": ["train", RECIPE, "--key", "value", ...], "trace": PATH or null}`. With `trace`,
every process appends the `id` column of each batch it decodes, one JSON line per batch, to `PATH.rank<N>` (to
check which samples each process saw).
"""
import json
import os
import sys

from hf_ssl import cli
from hf_ssl.data import ImageDecoder


def traced(path: str):
    original = ImageDecoder.__call__

    def call(self, rows):
        with open(path, "a") as f:
            f.write(json.dumps([row["id"] for row in rows]) + "\n")
        return original(self, rows)

    return original, call


def main() -> int:
    runs = json.loads(open(sys.argv[1]).read())
    # RANK from the launcher (an accelerate PartialState() made here, before the training's Accelerator, would not
    # see ACCELERATE_USE_CPU and would set up one process without a process group)
    rank = int(os.environ.get("RANK", 0))
    for run in runs:
        original = None
        if run.get("trace"):
            original, call = traced(f"{run['trace']}.rank{rank}")
            ImageDecoder.__call__ = call
        try:
            code = cli.main(run["args"])
        finally:
            if original is not None:
                ImageDecoder.__call__ = original
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
