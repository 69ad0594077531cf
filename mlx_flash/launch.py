"""Start every rank of a pipeline (mlx_flash.pipeline) with MLX's own launcher, and say when one fails.

    python -m mlx_flash.launch --ranks 2 -- generate --model models/opt-6.7b --mode flash --pipeline -p "Hi"
    python -m mlx_flash.launch --hosts 10.0.0.1,10.0.0.2 -- generate --model models/opt-6.7b --pipeline

`--ranks N` runs N ranks on this machine; `--hosts` one per host, over ssh (the same folder layout on each,
every host holding its own rank's folder). The command after `--` is an mlx_flash command (generate,
server) or a script. This is `mlx.launch --backend ring` (mlx.launch's own flags pass through after
--launch-args), with what it leaves out: its exit status is 0 even when a rank failed, so this one
returns non-zero then, prints the failure in one line when the rank did not say why itself, drops
the ring backend's per-socket complaints, and stops ranks that linger after another failed (a
stopped process ignores mlx.launch's SIGTERM).
"""

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from .errors import FlashError, cli

COMMANDS = ("generate", "server")
GRACE_S = 5.0  # after a rank failed: how long the others get to exit before they are killed
_NODE = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def launch_command(args, command) -> list:
    if not command:
        raise FlashError("no command to run: python -m mlx_flash.launch --ranks 2 -- generate --model DIR --pipeline ...")
    if command[0] in COMMANDS:
        command = ["-m", f"mlx_flash.{command[0]}", *command[1:]]
    hosts = ["--hosts", args.hosts] if args.hosts else ["-n", str(args.n)]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = "
            "'mlx.launch'; sys.exit(main())", "--backend", args.backend, *hosts,
            "--python", args.python or sys.executable, *shlex.split(args.launch_args or ""), "--", *command]


class Watch:
    """mlx.launch's stderr, passed through line by line, with the ranks' failures picked out of it."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.failed, self.said = proc, {}, False
        self.first_failure = None
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        for raw in iter(self.proc.stderr.readline, b""):
            line = _ANSI.sub("", raw.decode(errors="replace"))
            m = _NODE.search(line)
            if m:
                code = int(m.group(2)) if m.group(2) is not None else -signal.SIGKILL
                self.failed.setdefault(int(m.group(1)), code)
                self.first_failure = self.first_failure or time.monotonic()
                continue
            if line.startswith("[ring]"):  # the backend's complaint per socket once a peer is gone
                continue
            if line.startswith("error:"):
                self.said = True
                self.first_failure = self.first_failure or time.monotonic()
            sys.stderr.write(line)
            sys.stderr.flush()


def describe(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank} was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"rank {rank} exited with code {code}"


def run(args, command) -> int:
    proc = subprocess.Popen(launch_command(args, command), stderr=subprocess.PIPE, start_new_session=True)
    # stopped itself (a server's end), it stops every rank: they are in mlx.launch's session, not ours
    signal.signal(signal.SIGTERM, lambda *_: (os.killpg(proc.pid, signal.SIGTERM), sys.exit(128 + signal.SIGTERM)))
    watch = Watch(proc)
    try:
        while proc.poll() is None:
            time.sleep(0.1)
            if watch.first_failure and time.monotonic() - watch.first_failure > GRACE_S:
                os.killpg(proc.pid, signal.SIGKILL)  # a rank that does not exit (stopped, or stuck in a send)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    watch.thread.join(timeout=5)
    failed = {r: c for r, c in watch.failed.items() if c != 0}  # in the order mlx.launch reported them
    if not failed and proc.returncode == 0 and not watch.said:
        return 0
    if not watch.said:  # no rank said why: say which one failed (not one that mlx.launch stopped: SIGTERM)
        first = [(r, c) for r, c in failed.items() if c != -signal.SIGTERM] or list(failed.items())
        rank, code = first[0] if first else (None, proc.returncode)
        what = describe(rank, code) if rank is not None else f"mlx.launch exited with code {code}"
        print(f"error: {what}; the other ranks were stopped", file=sys.stderr)
    codes = [c for c in failed.values() if c > 0]
    return codes[0] if codes else 1


def setup_arg_parser():
    p = argparse.ArgumentParser(description="Run an mlx_flash command on every rank of a pipeline (mlx.launch).",
                                usage="python -m mlx_flash.launch (--ranks N | --hosts A,B) -- COMMAND [ARGS ...]")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ranks", dest="n", type=int, help="ranks on this machine (mlx.launch's -n)")
    where.add_argument("--hosts", help="comma-separated IPs, one rank per host (ssh, same paths on each)")
    p.add_argument("--backend", default="ring", help="mx.distributed backend (default: ring, over TCP)")
    p.add_argument("--python", default=None, help="the interpreter on the hosts (default: this one)")
    p.add_argument("--launch-args", default=None, help="more flags for mlx.launch, quoted as one argument")
    return p


@cli
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = setup_arg_parser().parse_args(argv[:cut])
    if args.n is not None and args.n < 1:
        raise FlashError("--ranks must be at least 1")
    sys.exit(run(args, argv[cut + 1 :]))


if __name__ == "__main__":
    main()
