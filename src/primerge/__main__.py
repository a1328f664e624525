"""``python -m primerge`` runs the command-line interface."""

from primerge.cli import main

raise SystemExit(main())
