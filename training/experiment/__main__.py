"""``python -m training.experiment``: the compression experiment's command line (``training.experiment.run``)."""

import sys

from training.experiment.run import main

sys.exit(main())
