"""Progress lines of long jobs, on stderr, written so that tqdm progress bars stay intact."""

import sys

from tqdm.auto import tqdm


def log(program: str, message: str) -> None:
    """Write "[program] message" to stderr at once (between progress-bar redraws)."""
    tqdm.write(f"[{program}] {message}", file=sys.stderr)
