"""Saving and loading fitted estimators with pickle/joblib across skmerge versions."""

from . import __version__
from .errors import IncompatibleVersionError

# Bumped whenever the fitted attributes change meaning or layout.
PERSISTENCE_FORMAT = 2


class PersistentMixin:
    """Pickles without the live TensorFlow model (rebuilt from the numpy weights on first
    use) and refuses, with :class:`~skmerge.errors.IncompatibleVersionError`, a pickle
    written by another minor version or persistence format."""

    def __getstate__(self):
        # object.__getstate__ hands back the live __dict__: copy before editing.
        state = dict(super().__getstate__())
        state.pop("_model", None)
        state["_skmerge_persistence"] = PERSISTENCE_FORMAT
        return state

    def __setstate__(self, state):
        fmt = state.pop("_skmerge_persistence", None)
        version = state.get("skmerge_version_")
        if version is not None and (fmt != PERSISTENCE_FORMAT or version.split(".")[:2] != __version__.split(".")[:2]):
            raise IncompatibleVersionError(
                f"this merger was saved by skmerge {version} (format {fmt}); skmerge "
                f"{__version__} cannot load it. Refit it, or install skmerge {version}."
            )
        super().__setstate__(state)
