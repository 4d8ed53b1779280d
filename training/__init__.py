"""Offline jobs of spkserve, laid out as the compression pipeline runs:

- ``training.data``: corpora (synthetic voices, real-speech pools), channels, conversations, features;
- ``training.pretraining``: SSL pretraining of the testbed encoders, distillation, speaker fine-tuning;
- ``training.compression``: the method (clusters, activation statistics, speaker neurons, pruning);
- ``training.experiment``: the experiment that tests it (protocols, statistics, verdict, report);
- ``training.evaluation``: evaluation, calibration and decision checks of exported models.

``common`` (splits, resumable runs) and ``distributed`` (torchrun helpers) serve them all. The
flat module paths of earlier releases still import (``training._moved``), with a warning.
"""

from training._moved import install as _install_moved

_install_moved()
