"""Converters from the data sets' published layouts into xray_match shards (docs/data.md).

One module per data set, each with a ``convert_<name>(out, <inputs>, *, opts)`` function:
:mod:`.coco` (official captions or Karpathy split), :mod:`.flickr30k` (Karpathy split or the
original token file), :mod:`.entities` (Flickr30k Entities phrase -> box links), :mod:`.salicon`
(saliency maps joined to COCO), :mod:`.scan_features` (SCAN / bottom-up precomputed regions).
The CLI is :mod:`xray_match.cli_data` (``xray-match data coco|flickr30k|entities|salicon|scan``).

A conversion runs in two phases. *Plan* (driver, cheap): the converter reads its annotations into
records and counts every mismatch (:mod:`.plan`), from input files (:mod:`.inputs`), captions
(:mod:`.captions`), images (:mod:`.images`) and Karpathy split files (:mod:`.karpathy`). *Write*:
a builder turns each record into a shard sample, written resumably in a process pool or as Ray
tasks (:mod:`.write`, :mod:`.ray_tasks`).
"""

from xray_match.data.convert.coco import convert_coco
from xray_match.data.convert.entities import convert_entities
from xray_match.data.convert.flickr30k import convert_flickr30k
from xray_match.data.convert.plan import ConversionError, ConvertOptions
from xray_match.data.convert.salicon import convert_salicon
from xray_match.data.convert.scan_features import convert_scan

__all__ = [
    "ConversionError", "ConvertOptions", "convert_coco", "convert_flickr30k", "convert_entities", "convert_salicon",
    "convert_scan",
]
