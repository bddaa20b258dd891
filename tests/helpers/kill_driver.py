"""`python tests/helpers/kill_driver.py STAGE N <run.py arguments>`: `run.py`, its process group killed with
SIGKILL right after the N-th record of STAGE's store is written.

The Ray resume tests use it to kill a real driver, and the local Ray cluster it started (Ray makes the
driver its process group's leader), at a point they choose instead of racing a timer: no cleanup, no
final flush, as `kill -9` or a preempted node does.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from palign.artifacts import stores

stage, after = sys.argv[1], int(sys.argv[2])
original_add = stores.RecordStore.add
written = 0


def add_then_maybe_kill(self, record):
    global written
    original_add(self, record)
    # <cache>/<stage>/<fingerprint>/records.jsonl, or <run>/eval/<fingerprint>/<benchmark>.jsonl
    if Path(self.path).parent.parent.name == stage:
        written += 1
        if written == after:
            os.killpg(os.getpgrp(), signal.SIGKILL)


stores.RecordStore.add = add_then_maybe_kill
run_py = Path(__file__).resolve().parents[2] / "run.py"
sys.argv = [str(run_py), *sys.argv[3:]]
runpy.run_path(str(run_py), run_name="__main__")
