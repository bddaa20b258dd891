"""`python tests/helpers/kill_mid_write.py BYTES <run.py arguments>`: `run.py`, killed by the kernel in the middle
of its first write that takes a file past BYTES.

RLIMIT_FSIZE caps the size of every file the process writes; the write that reaches the cap gets
SIGXFSZ, whose default action ends the process there and then, mid-syscall, as `kill -9` would: no
cleanup, no exception, no `finally`. Python ignores SIGXFSZ (the write would fail with EFBIG and
unwind), so the default action is restored first. The exact-resume test sets BYTES to half a
checkpoint: the run dies while writing its next checkpoint, at a byte it chose.
"""

from __future__ import annotations

import resource
import runpy
import signal
import sys
from pathlib import Path

limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the default action dumps core: no core file
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
run_py = Path(__file__).resolve().parents[2] / "run.py"
sys.argv = [str(run_py), *sys.argv[2:]]
runpy.run_path(str(run_py), run_name="__main__")
