"""``python -m lens_laai.cli`` runs the ``lens-laai`` command."""

from lens_laai.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
