"""``python -m kdjax <task> ...``: the same command line as the ``kdjax`` console script."""
from kdjax.cli import main

if __name__ == "__main__":
    main()
