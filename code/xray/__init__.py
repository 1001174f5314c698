"""The chest X-ray experiments: config, data, Spark ML pipeline, evaluation and command line.

Built on :mod:`imagefeaturizer`, which knows nothing of X-rays.
"""
