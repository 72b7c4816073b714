"""``python -m lens_laai.cli`` runs the ``lens-laai`` command."""

from lens_laai.cli.main import main

raise SystemExit(main())
