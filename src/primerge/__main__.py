"""``python -m primerge`` runs the command-line interface."""

from primerge.cli.main import main

raise SystemExit(main())
