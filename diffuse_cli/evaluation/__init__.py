"""How good a model is, in the numbers papers report: the FID network (inception.py), FID, KID, precision/recall
and copies of the training set (scores.py), and scoring folders or a run with a cache of reference features
(features.py)."""
