"""``python -m ovss_label``: the ``ovss-label`` command (what the server's training worker runs
in its subprocesses, with the server's own interpreter; such a subprocess dies with the server,
``learning/runner.py`` ``die_with_parent``)."""

from ovss_label.backend.learning.runner import die_with_parent
from ovss_label.cli import main

die_with_parent()
main()
