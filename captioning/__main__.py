"""``python -m captioning ...``: the same commands as the installed ``captioning`` entry point."""

from .commands import main

main(prog_name="captioning")
