"""Checks of the data around a merge: problems that do not stop it but spoil its result.

The warnings are plain strings (or None when all is well), so that
:func:`skmerge.run_merge` can return and log them and the command line can print them.
"""

import numpy as np

from .errors import InputError
from .io.writers import prediction_flags

# Observation-table columns read_unmerged provides whatever the file format.
SPECIAL_KEYS = ("dHKL", "Hobs", "Kobs", "Lobs", "image_id", "file_id")
_MEDIAN_CHI2_1 = 0.4549  # median of z² for z ~ Normal(0, 1)
# Between the rotation and Laue data sets, where the error model is optional, and serial
# stills, which need it (bench/RESULTS.md).
_SCATTER_LIMIT = 3.0


def check_metadata_keys(keys, X):
    """Raise InputError for metadata keys the observation table lacks, listing the
    available ones.

    Parameters
    ----------
    keys : list of str
        Metadata columns of the scale model.
    X : DataFrame
        The observation table of :func:`skmerge.read_unmerged`.
    """
    from .table import TABLE_COLUMNS

    from_files = [str(c) for c in X.columns if c not in TABLE_COLUMNS]
    available = [*SPECIAL_KEYS, *from_files]
    unknown = [k for k in keys if k not in available]
    if unknown:
        raise InputError(
            f"unknown metadata key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; available: "
            f"{','.join(SPECIAL_KEYS)} (always) and {','.join(from_files) or 'none'} (from the files)"
        )


def partiality_warning(X, keys):
    """A warning when most observations are partials and no metadata key describes the
    fraction recorded, else None.

    Parameters
    ----------
    X : DataFrame
        The observation table; its ``PARTIAL`` column is the M/ISYM partial flag of raw
        MOSFLM/XDS output.
    keys : list of str
        Metadata columns of the scale model.

    Examples
    --------
    >>> import pandas as pd
    >>> X = pd.DataFrame({"PARTIAL": [True, True, False], "FRACTIONCALC": [0.3, 0.7, 1.0]})
    >>> partiality_warning(X, ["dHKL", "FRACTIONCALC"]) is None
    True
    >>> partiality_warning(X, ["dHKL"])[:48]
    '67% of the observations are flagged partial; the'
    """
    if "PARTIAL" not in X.columns or "FRACTIONCALC" in keys:
        return None
    fraction = float(X["PARTIAL"].to_numpy(dtype=float, na_value=0).mean())
    if fraction < 0.1:
        return None
    hint = ("add FRACTIONCALC to the metadata keys" if "FRACTIONCALC" in X.columns
            else "give the scale model a partiality column, or sum the partials first")
    return (f"{fraction:.0%} of the observations are flagged partial; their intensities are fractions of the "
            f"reflections', which also divides reflections between the halves of half-dataset splits and "
            f"lowers CC1/2 and CCanom: {hint}")


def sigma_scatter(predictions):
    """How many times more the fitted observations scatter about their predictions than
    their σ say: √(median z² / 0.455), z = (Iobs − Ipred)/σ over the rows with
    ``test == 0``.

    0.455 is the median of z² for correct σ; the median keeps a few outliers from
    setting the factor.

    Parameters
    ----------
    predictions : DataFrame
        Iobs, SIGIobs, Ipred and test per observation (the predictions table of a merge).
    """
    return scatter_factor(np.median(fitted_square_residuals(predictions)))


def fitted_square_residuals(predictions):
    """z² = ((Iobs − Ipred)/σ)² of the rows of a predictions table the fit saw (neither
    held out nor shadowed)."""
    held_out, shadowed = prediction_flags(predictions)
    fitted = ~(held_out | shadowed)
    z = (predictions["Iobs"].to_numpy(float) - predictions["Ipred"].to_numpy(float)) / predictions[
        "SIGIobs"].to_numpy(float)
    return z[fitted] ** 2


def scatter_factor(median_square):
    """:func:`sigma_scatter` from the median of the fitted observations' z² (computed
    elsewhere, e.g. from predictions read piece by piece)."""
    return float(np.sqrt(median_square / _MEDIAN_CHI2_1))


def sigma_scatter_warning(factor):
    """A warning when the scatter ``factor`` (:func:`sigma_scatter`) exceeds 3 — σ too
    small for the data, which the error model corrects — else None."""
    if not factor > _SCATTER_LIMIT:
        return None
    return (f"the observations scatter about the fitted model {factor:.1f} times more than their sigmas say; "
            "with sigmas that small the fit chases the wildest observations: keep the error model "
            "(drop --no-error-model, or error_model=None)")
