"""Shard format (format.py), atomic writers (writer.py), the embedded digit-scenes data set
(digit_scenes.py), converters of published data sets (convert/), streaming readers (reader.py).

Nothing is imported here: generator and converter processes should not pay for torch.
"""
