"""Measuring models: classification accuracy (:mod:`mcbeit.evaluation.classification`) and the quality
of frozen features, weighted k-NN and a quick linear probe (:mod:`mcbeit.evaluation.knn`)."""
