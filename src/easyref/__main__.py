"""``python -m easyref``: the same command line as the ``easyref`` script."""

from easyref.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
