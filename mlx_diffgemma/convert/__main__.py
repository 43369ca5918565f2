"""python -m mlx_diffgemma.convert, as mlx-lm users type it."""

import sys

from mlx_diffgemma.cli import run

run(["convert", *sys.argv[1:]])
