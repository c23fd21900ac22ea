"""Experiment infrastructure: datasets, the model-zoo manifest, the training recipe, evaluation.

Nothing here is needed to fuse models (:mod:`fusion` builds them from any models and
calibration data); these modules measure fusion and reproduce the zoo:

* :mod:`fusion.experiments.data`: Fashion-MNIST, digits, image folders, torchvision
  datasets and ``module:function`` specs; class subsets, calibration subsets.
* :mod:`fusion.experiments.zoo`: the zoo manifest (names, constructor specs, training
  metadata) and loading zoo models by name.
* :mod:`fusion.experiments.train`: the training recipe the zoo was made with.
* :mod:`fusion.experiments.evaluate`: accuracy, loss, ensembles, 5+5 split tasks.
"""

__all__ = ["data", "evaluate", "train", "zoo"]
