"""``python -m slimlm``: the same command line as ``slimlm``."""

from slimlm.cli import app

app(prog_name="slimlm")
