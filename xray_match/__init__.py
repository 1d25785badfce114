"""xray_match: distributed training of image-text matching and grounding models on Ray.

Methods: intermodal contrastive (InfoNCE with batch / queue / rerank negatives, gaze), RDAN,
DSPE and MCB attention grounding, all through one shared loop (``xray_match.train``).
"""

__version__ = "0.1.0"


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu"):
    """Load a registered model (``models:/xray-match-moco@champion``, ``models:/NAME/VERSION``) or a
    checkpoint path ready for inference (:mod:`xray_match.tracking.models`)."""
    from xray_match.tracking.models import load_model as _load

    return _load(uri, tracking_uri=tracking_uri, device=device)


__all__ = ["load_model", "__version__"]
