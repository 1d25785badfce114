"""Serving a registered image-text model: a faiss index of a shard folder built with Ray Data
(:mod:`.index`), the search core (:mod:`.search`) and the Ray Serve application with its web page
(:mod:`.app`). Models are loaded through one adapter, :mod:`.model`.

    xray-match index --model models:/xray-match-moco@champion --data SHARDS --out DIR
    xray-match serve --model models:/xray-match-moco@champion --index DIR
"""
