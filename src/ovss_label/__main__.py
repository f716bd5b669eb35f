"""``python -m ovss_label``: the ``ovss-label`` command (what the server's training worker runs
in its subprocesses, with the server's own interpreter)."""

from ovss_label.cli import main

main()
