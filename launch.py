"""kdjax's command line from a checkout: ``python launch.py --config=configs/<task>.py[:k=v,...] [--config.a.b=v]
--workdir=DIR``, or ``python launch.py <task> ...``; exactly ``kdjax ...`` (see ``kdjax.cli``)."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "src"))  # the checkout's package, installed or not

from kdjax.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
