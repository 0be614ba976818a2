"""`python -m trainer`: the readable source's command line (the shipped file ends the same way)."""

import sys

from trainer.settings import missing_package

try:
    from trainer.main import run_cli
except ModuleNotFoundError as missing:
    sys.exit(missing_package(missing.name))

sys.exit(run_cli(sys.argv[1:]))
