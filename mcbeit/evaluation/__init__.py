"""Measuring models: classification accuracy (:mod:`mcbeit.evaluation.classification`)."""
