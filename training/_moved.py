"""Old module paths of ``training`` (before it was split into subpackages), kept as aliases for one
release: ``import training.pretrain`` gives ``training.pretraining.pretrain`` itself, and
``python -m training.pretrain`` runs it, with a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

MOVED = {
    **{f"training.{m}": f"training.data.{m}" for m in
       ("corpus", "channels", "features", "realspeech", "realspeech_sources", "conversations")},
    **{f"training.{m}": f"training.pretraining.{m}" for m in ("pretrain", "pretrain_data", "distill", "finetune")},
    **{f"training.{m}": f"training.compression.{m}" for m in ("neurons", "ivector", "protection", "prune")},
    **{f"training.{m}": f"training.experiment.{m}" for m in ("downstream", "stats", "report", "analysis")},
    **{f"training.{m}": f"training.evaluation.{m}" for m in
       ("evaluate", "decisions", "calibrate", "recalibrate", "cohort", "realembed", "robustness", "diarization_eval")},
    "training.protocol_superb": "training.experiment.superb",
    "training.protocol_finetuned": "training.experiment.finetuned",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new path (the same object)."""

    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        """The new module, imported; its own spec is kept (``exec_module`` restores it)."""
        warnings.warn(f"{spec.name} moved to {self.new}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        """Nothing to run: the module is already executed; restore the spec the import system replaced."""
        module.__spec__ = self._spec

    def get_code(self, fullname: str):
        """The new module's code, for ``python -m OLD`` (runpy runs it as ``__main__``)."""
        return importlib.util.find_spec(self.new).loader.get_code(self.new)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        """A spec for an old path, None for anything else."""
        new = MOVED.get(fullname)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new)) if new else None


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
