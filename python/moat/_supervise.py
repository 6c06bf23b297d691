"""The supervisor of a run started from Python: `python -m moat._supervise`.

moat starts it itself (see `moat.run`); it reads the run's description on
standard input and owns the run until its container exits.
"""

import sys

from moat import _moat

if __name__ == "__main__":
    sys.exit(_moat._supervise())
