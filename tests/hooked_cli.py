"""`python -m hf_ssl ...` with one test hook installed, for the kill tests of tests/test_reliability.py.

    python tests/hooked_cli.py HOOK STEP train RECIPE [--key value ...]

HOOK:
  block_after_step  once STEP optimizer steps are done (their metrics written, their checkpoint if any saved),
                    print "BLOCKED" and sleep: the test SIGKILLs the process from outside, between checkpoints.
  kill_in_save      while saving the checkpoint of step STEP: after accelerate has written the state files
                    into checkpoints/.tmp_step_STEP, cut model.safetensors in half and SIGKILL this process
                    (before config.json and before the rename), as a kill in the middle of a save would.
"""
import os
import runpy
import signal
import sys
import time
from pathlib import Path

hook, hook_step, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
sys.path.pop(0)  # this file's directory: run exactly as `python -m hf_ssl` would

import hf_ssl.train as train  # noqa: E402

if hook == "block_after_step":
    schedule_values = train.schedule_values

    def blocking_schedule_values(recipe, progress, *rest, **kwargs):
        if progress.step == hook_step:  # the first call for step STEP + 1: step STEP is complete
            print("BLOCKED", flush=True)
            time.sleep(600)
        return schedule_values(recipe, progress, *rest, **kwargs)

    train.schedule_values = blocking_schedule_values
elif hook == "kill_in_save":
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def killed_save_state(self, output_dir=None, **kwargs):
        result = save_state(self, output_dir, **kwargs)
        if Path(output_dir).name == f".tmp_step_{hook_step}":
            weights = Path(output_dir) / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    Accelerator.save_state = killed_save_state
else:
    raise SystemExit(f"unknown hook {hook!r}")

sys.argv = ["hf_ssl", *args]
runpy.run_module("hf_ssl", run_name="__main__", alter_sys=True)
