"""Sparse dictionaries (sparse autoencoders) next to the model.

``model.attach_dictionary("res3", folder_or_weights, point="layers.3.resid_post")`` makes a
dictionary's features, reconstruction and error probe points (``dict:res3:features`` …), so
every tool works on features. This package holds what a dictionary *is* — the SAELens format
(:mod:`~cloche.dictionaries.format`), the module that encodes and decodes
(:mod:`~cloche.dictionaries.modules`) — and training one (TopK, standard, JumpReLU, or a
transcoder between two points) where its point lives (:mod:`~cloche.dictionaries.training`),
which drives the model only through its public methods.
"""

from cloche.dictionaries.format import DictionaryConfig, load_folder, save_folder
from cloche.dictionaries.modules import SparseDictionary, build_dictionary
from cloche.dictionaries.training import TrainingResult, evaluate_dictionary, train_dictionary

__all__ = ["DictionaryConfig", "SparseDictionary", "TrainingResult", "build_dictionary",
           "evaluate_dictionary", "load_folder", "save_folder", "train_dictionary"]
