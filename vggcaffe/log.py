"""Training logs in Caffe's glog line format, so parse_log-style tools keep working.

Lines look like `I1122 16:01:02.123456  4242 solver.py] Iteration 100, loss = 0.5`
and go to stderr, as Caffe's (glog) and Python's logging do, so results printed
on stdout (tables, summaries) stay apart: `2>&1 | tee train.log` keeps both, as
with Caffe. On a terminal a tqdm progress bar runs beneath the lines.
"""
import os
import sys
from datetime import datetime

from tqdm import tqdm


def log(message, root=True):
    """Print one log line (only on the root process when running several)."""
    if not root:
        return
    now = datetime.now()
    prefix = f"I{now:%m%d %H:%M:%S}.{now.microsecond:06d} {os.getpid():6d} solver.py]"
    tqdm.write(f"{prefix} {message}", file=sys.stderr)
    sys.stderr.flush()


def progress(total, root=True):
    """A tqdm bar on stderr when it is a terminal; a silent stand-in otherwise."""
    return tqdm(total=total, unit="it", leave=False, dynamic_ncols=True,
                disable=not (root and sys.stderr.isatty()))
