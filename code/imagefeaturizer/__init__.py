"""A Keras image featurizer for Spark ML.

- :mod:`imagefeaturizer.images`: bytes or Spark's image struct in, an RGB image out, or a clear
  reason why not.
- :mod:`imagefeaturizer.backbones`: the backbone registry and ``weights`` resolution.
- :mod:`imagefeaturizer.engines`: running a built backbone: uint8 batches in, pooled features
  (and the last spatial feature maps when asked) out.
- :mod:`imagefeaturizer.runtime`: what lives in a Spark Python worker (the per-process model
  cache, thread and GPU set-up, shipped weights, the UDF body).
- :mod:`imagefeaturizer.featurizer`: the ``KerasImageFeaturizer`` Transformer.

Nothing here knows about X-rays, configs or command lines.
"""

from .backbones import BACKBONES, Backbone, WeightsError, WeightsUnavailableError, get_backbone
from .images import InvalidImageError, decode_image

__all__ = [
    "BACKBONES",
    "Backbone",
    "InvalidImageError",
    "KerasImageFeaturizer",
    "WeightsError",
    "WeightsUnavailableError",
    "decode_image",
    "get_backbone",
]


def __getattr__(name):
    # The Transformer imports pyspark; keep `import imagefeaturizer` light for the registry.
    if name == "KerasImageFeaturizer":
        from .featurizer import KerasImageFeaturizer

        return KerasImageFeaturizer
    raise AttributeError(name)
