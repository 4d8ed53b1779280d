"""The compression experiment: does protecting speaker neurons make FFN pruning keep speaker accuracy?

Modules, in the order the experiment runs them:
- ``run``: the configuration (the declared design), its checks and the command line
  (``python -m training.experiment``);
- ``superb``: the published protocol (prune, then a fresh downstream on the frozen upstream), with
  calibration draws, controls and the SSL-stage protocol inside it;
- ``ssl_stage``: continued pretraining of pruned upstreams under one budget;
- ``finetuned``: the fine-tuned-model protocol;
- ``downstream``: the SUPERB-style speaker head;
- ``stats`` and ``summary``: intervals, the gate, the verdict, ``summary.json``;
- ``report`` and ``analysis``: ``results.md``, plots, layer-wise analyses.
"""

from __future__ import annotations

__all__ = ["ExperimentConfig", "Calibration", "check_config", "run_experiment", "speaker_neuron_sets", "load_speaker_model",
           "main"]


def __getattr__(name: str):
    """The run module's public names, imported on first use (so ``training.experiment.stats`` alone
    does not load the whole experiment)."""
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("training.experiment.run"), name)
    raise AttributeError(f"module 'training.experiment' has no attribute {name!r}")
