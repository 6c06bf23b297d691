"""The routing proxy of a moat home, started from Python:
`python -m moat._router --port N [--manual]`.

moat starts it itself when a run has `ports:`; `moat proxy start` does the
same from the command line.
"""

import argparse
import sys

from moat import _moat


def main() -> int:
    """Parses the arguments and serves until SIGTERM; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m moat._router")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--manual", action="store_true")
    args = parser.parse_args()
    return _moat._router(args.port, args.manual)


if __name__ == "__main__":
    sys.exit(main())
