"""Evaluation protocols for pre-trained encoders: linear probe, k-NN and fine-tuning.

`knn` holds the weighted k-nearest-neighbour classifier of DINO / iBOT together with a helper
that extracts features from an evaluation iterator.
"""
