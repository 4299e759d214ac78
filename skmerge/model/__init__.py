"""The probabilistic model: surrogate posteriors, priors, likelihoods, the scale model and
the training loop. Only this package (and the estimator that drives it) touches TensorFlow.
"""
