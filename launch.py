"""kdjax's command line from a checkout: ``python launch.py --config=configs/<task>.py[:k=v,...] [--config.a.b=v]
--workdir=DIR``, or ``python launch.py <task> ...``; exactly ``kdjax ...`` (see ``kdjax.cli``)."""
from kdjax.cli import main

if __name__ == "__main__":
    main()
