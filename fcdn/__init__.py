"""FC-DenseNet semantic segmentation for microscopy: the internals behind the scripts.

One folder a stage: `data` (image files, LMDB records, the training reader's workers), `model`
(the SavedModel and its receptive field), `training`, `inference`, `export` (BioImage Model Zoo),
and `common` (safe writes, errors, signals, devices, pictures). The model itself is the top-level
`fcdensenet` module; `imagereader` and `augment` feed training.
"""

__version__ = "1.0.0"
