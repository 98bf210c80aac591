"""The embedded default model: an unconditional DDIM model of 16x16 handwritten digits.

Trained by ``fastdiff train`` (see :mod:`fastdiff.train`) on scikit-learn's digits; its sample
quality is in ``benchmarks/results/default_model_quality.md``. ``DEFAULT_MODEL`` is the path of the
diffusers pipeline folder (model_index.json, unet/, scheduler/)::

    pipe = fastdiff.DiffusionPipeline.from_pretrained(fastdiff.default_model.DEFAULT_MODEL)
"""

import os

DEFAULT_MODEL = os.path.dirname(os.path.abspath(__file__))
