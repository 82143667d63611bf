"""``python -m kdjax.data.streamed --dataset=imagenet --manual_dir=DIR``: prepare a streamed dataset (see
``kdjax.data.streamed.prepare``)."""
import sys

from kdjax.data.streamed.prepare import main

sys.exit(main())
