"""Worker processes and the user's script.

The toolkit starts its worker processes with ``spawn`` (the parent holds TensorFlow's threads, which ``fork`` would
copy half-way). A spawned worker first runs the user's main script again, as ``__mp_main__``; a script that calls
the toolkit at its top level, without ``if __name__ == "__main__":``, would start a second run inside every worker.
:func:`refuse_in_a_starting_worker` stops such a call at once, with the check multiprocessing itself makes before a
starting process may start others.
"""

from __future__ import annotations

import multiprocessing

GUARD_HINT = 'put the script\'s toolkit calls under `if __name__ == "__main__":`'


def starting_worker() -> bool:
    """Whether this process is a spawned worker still re-running the main script (multiprocessing's own flag)."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def refuse_in_a_starting_worker(call: str) -> None:
    """End this process with one line when ``call`` runs in a worker that is re-running the main script."""
    if starting_worker():
        raise SystemExit(f"toolkit: {call} was called while a worker process re-ran the main script; {GUARD_HINT}")
