"""How a gateway or decision-service process ends, without importing
mitmproxy: the commands that never start a proxy (`check`, `explain`,
`serve`, ...) start half a second sooner for it."""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """End a gateway process that has stopped: exit handlers run, output is
    flushed, and the interpreter's own teardown is skipped. With an https://
    upstream that teardown crashed now and then (SIGSEGV while finalizing,
    after the gateway had stopped cleanly: 1 exit in 10 to 20 here, never
    with an http:// one); nothing in it matters once the gateway is done."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
