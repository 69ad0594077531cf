"""Errors a user can cause, and the one-line report the commands print for them."""

import functools
import sys


class FlashError(Exception):
    """A problem with the user's input (model, files, budget, request): one clear sentence."""


def cli(main):
    """Wrap a command's main(): a FlashError becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FlashError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
