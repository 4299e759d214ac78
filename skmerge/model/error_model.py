"""The error model: the observations' σ refined by parameters learned with the model.

:class:`ErrorModel` is a configuration object (usable as a value in a parameter grid);
``build`` makes the learnable TensorFlow module that every likelihood's σ passes through.
"""

from numbers import Real

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval

from .._tf import tf, tfb, tfp


class ErrorModel(BaseEstimator):
    """Refined uncertainties σ' = SdFac·√(σ² + (SdAdd·Ipred)²), with SdFac and SdAdd
    learned with the rest of the model (an AIMLESS-style error model without SdB).

    Integration programs often understate σ, and for stills σ leaves out the error of
    the partiality. With σ too small the likelihood is dominated by a few wild
    observations, and the fit trades the amplitudes for scales that chase them.

    A fit starts from the reported σ (SdFac 1, SdAdd 0.01). Residuals of the quick merge
    that starts the posterior are no guide: it ignores partiality, and suggests SdFac
    several times larger than where fits settle.

    Parameters
    ----------
    sdfac, sdadd : float, default=1.0, 0.01
        Starting values of SdFac and SdAdd.
    """

    _parameter_constraints = {
        "sdfac": [Interval(Real, 0, None, closed="neither")],
        "sdadd": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(self, sdfac=1.0, sdadd=0.01):
        self.sdfac = sdfac
        self.sdadd = sdadd

    def build(self, sdfac=None, sdadd=None):
        """The learnable error model, started at the given (fitted) values, else at this
        object's ``sdfac`` and ``sdadd``.

        Returns
        -------
        ErrorModelModule
        """
        return ErrorModelModule(self.sdfac if sdfac is None else sdfac, self.sdadd if sdadd is None else sdadd)


class ErrorModelModule(tf.Module):
    """The TensorFlow side of :class:`ErrorModel`: SdFac and SdAdd as variables, kept
    positive by an exponential bijector on their logarithms."""

    def __init__(self, sdfac, sdadd, name="error_model"):
        super().__init__(name=name)
        self.log_sdfac = tf.Variable(np.log(sdfac), dtype=tf.float32, name="log_sdfac")
        self.log_sdadd = tf.Variable(np.log(sdadd), dtype=tf.float32, name="log_sdadd")
        self.sdfac = tfp.util.DeferredTensor(self.log_sdfac, tfb.Exp())
        self.sdadd = tfp.util.DeferredTensor(self.log_sdadd, tfb.Exp())

    def __call__(self, sigma, predicted):
        """σ' of every observation."""
        return self.sdfac * tf.sqrt(tf.square(sigma) + tf.square(self.sdadd * predicted))

    def get_weights(self):
        """np.array([SdFac, SdAdd]), exponentiated in double precision so that a model
        rebuilt from them has bit for bit the same variables."""
        return np.exp(np.array([self.log_sdfac.numpy(), self.log_sdadd.numpy()], np.float64))


def make_error_model(error_model):
    """The error model object for an estimator's ``error_model`` parameter: None or False
    for none, True for ``ErrorModel()``, or an :class:`ErrorModel`-like object, returned
    as is."""
    if error_model is None or error_model is False:
        return None
    if error_model is True:
        return ErrorModel()
    return error_model
