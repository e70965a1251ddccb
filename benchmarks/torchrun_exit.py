"""How the torchrun scripts of this folder end: :func:`finish`.

A gloo worker thread releases a finished collective's tensors a moment after the caller's
``wait()`` has returned. When that release falls into the interpreter's finalization, the
thread's attempt to take the GIL ends it with a forced unwind, and the whole process aborts
("terminate called without an active exception", SIGABRT, torchrun reports exit -6), after the
run's work was done and printed. Seen on a loaded 2-core machine in 2 of about 40 runs of
``distributed_train --parallel fsdp-tp``, once in CI; the core dump's aborting thread:
``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherCoalescedWork`` -> ``THPVariable_dealloc`` ->
``take_gil`` -> ``pthread_exit``, while the main thread was in ``Py_FinalizeEx``'s collection.
``destroy_process_group`` does not wait for those threads, so the scripts leave without
finalizing, once every rank is past its last collective.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch.distributed as dist


def finish(exit_code: int) -> NoReturn:
    """Barrier (no rank leaves while a peer still waits on its data), destroy the process groups,
    flush the output, and exit with ``exit_code`` without interpreter finalization."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
