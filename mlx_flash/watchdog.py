"""A watchdog in its own process: ends this one when a wait on another machine runs past its time.

MLX holds the interpreter's lock while it waits inside an operation (a distributed receive that
never completes), so no thread of the waiting process could act. The watchdog is a small child
process that the waiting one arms before each wait and disarms after; past the deadline it prints
the one line it was given and ends its parent (SIGTERM, whose default action needs no Python).

    dog = Watchdog()
    dog.arm(300, "error: rank 0: waiting for rank 1's activations: no answer within 300 s")
    ...  # the wait
    dog.disarm()
"""

import os
import select
import signal
import subprocess
import sys
import time


class Watchdog:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_flash.watchdog", str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)

    def _say(self, line: str):
        self.proc.stdin.write((line.replace("\n", " ") + "\n").encode())
        self.proc.stdin.flush()

    def arm(self, seconds: float, message: str):
        self._say(f"{seconds} {message}")

    def disarm(self):
        self._say("-")


def stopped(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    return state.strip().startswith("T")


def watch(parent: int):
    deadline, message, pending = None, "", b""
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([sys.stdin.buffer], [], [], wait)
        if not ready:  # the deadline passed while armed
            if stopped(parent):  # its own fault (SIGSTOP, ^Z), not the peer's: say nothing
                deadline = None
                continue
            print(message, file=sys.stderr, flush=True)
            os.kill(parent, signal.SIGTERM)
            return
        data = os.read(sys.stdin.fileno(), 4096)
        if not data:  # the parent is gone
            return
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line == b"-":
                deadline = None
            else:
                seconds, message = line.decode().split(" ", 1)
                deadline = time.monotonic() + float(seconds)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
