"""The project's tools: each module is a command (`python tools/NAME.py --help`).

They import the trainer's modules (`from trainer.files import write_atomic`) and each
other (`from tools import submission`) like any installed package: `pip install -e .`
(part of requirements-dev.txt) makes both importable from anywhere.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
