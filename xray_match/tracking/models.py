"""One model reference: parse it, resolve it to a version, pin it, load it.

A reference is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, a local checkpoint folder or file,
or another MLflow artifact URI (``runs:/RUN_ID/PATH``, ``s3://...``)::

    ref = ModelRef.parse("models:/xray-match-moco@champion")   # no registry access
    pinned = ref.resolve()      # the version the alias points at now: models:/xray-match-moco/3, alias kept
    model = pinned.load()       # the recipe's inference object, of exactly that version

A pinned reference keeps naming the version it was resolved to when the alias moves on, so
whoever receives it (a Serve replica, a Ray Data actor) loads the version that was checked, not
wherever the alias points by then. :meth:`ModelRef.follow` resolves the alias again, once, to a
new pinned reference.

Every failure to parse, find or load a reference is a :class:`ModelLookupError` with a one-line
message naming the reference (and, for the registry, the tracking URI). The tracking URI of a
reference is the one given, else :func:`xray_match.tracking.store.resolve_tracking_uri`'s rule.
MLflow is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any

from xray_match.tracking.store import client, resolve_tracking_uri

#: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
MODELS_URI = re.compile(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")


class ModelLookupError(LookupError):
    """A model reference that is malformed or names nothing loadable (one line: which, and where)."""


@dataclass(frozen=True)
class ModelRef:
    """A model reference. ``version`` is None only for an alias not resolved yet (:attr:`pinned`)."""

    uri: str  # as given (a local path made absolute)
    tracking_uri: str | None = None  # None for a local checkpoint
    name: str | None = None  # registered model name (None for a checkpoint or another URI)
    alias: str | None = None  # the alias it came from, kept when pinned
    version: str | None = None

    @classmethod
    def parse(cls, text: str, tracking_uri: str | None = None) -> "ModelRef":
        """``text`` -> a reference, checked for form only (the registry is not asked)."""
        if isinstance(text, str) and text and os.path.exists(text):
            return cls(uri=os.path.abspath(text))
        text = text if isinstance(text, str) else repr(text)
        if text.startswith("models:/"):
            m = MODELS_URI.fullmatch(text)
            if not m:
                raise ModelLookupError(f"{text!r}: not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
            name, alias, version = m.groups()
            return cls(uri=text, tracking_uri=resolve_tracking_uri(uri=tracking_uri), name=name, alias=alias,
                       version=version)
        if _SCHEME.match(text):  # runs:/..., s3://...: an MLflow artifact URI holding a checkpoint
            return cls(uri=text, tracking_uri=resolve_tracking_uri(uri=tracking_uri))
        raise ModelLookupError(f"{text!r}: no such checkpoint path, and not a models:/NAME@ALIAS or "
                               "models:/NAME/VERSION URI")

    @property
    def registered(self) -> bool:
        return self.name is not None

    @property
    def pinned(self) -> bool:
        """Names one exact model (a version, or a checkpoint), whatever an alias does later."""
        return not self.registered or self.version is not None

    @property
    def pinned_uri(self) -> str:
        """``models:/NAME/VERSION`` of a pinned registered reference, else the URI as given."""
        return f"models:/{self.name}/{self.version}" if self.registered and self.version else self.uri

    def __str__(self) -> str:
        if self.alias and self.version:
            return f"{self.pinned_uri} (@{self.alias})"
        return self.pinned_uri

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "name": self.name, "alias": self.alias, "version": self.version}

    # ---- the registry ---------------------------------------------------------------------
    def resolve(self) -> "ModelRef":
        """The pinned reference: an alias read once (the alias is kept), a version checked to exist."""
        if not self.registered:
            return self
        from mlflow.exceptions import MlflowException

        c = client(self.tracking_uri)
        try:
            mv = c.get_model_version_by_alias(self.name, self.alias) if self.version is None \
                else c.get_model_version(self.name, self.version)
        except MlflowException as e:
            raise self._lookup_error(c, e) from None
        return dataclasses.replace(self, version=str(mv.version))

    def follow(self) -> "ModelRef":
        """The alias resolved again, now (a pinned reference); a reference without alias as it is."""
        return dataclasses.replace(self, version=None).resolve() if self.alias else self

    def tags(self) -> dict[str, str]:
        """The pinned version's tags ({} for a checkpoint)."""
        if not self.registered:
            return {}
        from mlflow.exceptions import MlflowException

        c = client(self.tracking_uri)
        try:
            return dict(c.get_model_version(self.name, self._version()).tags)
        except MlflowException as e:
            raise self._lookup_error(c, e) from None

    def set_tag(self, key: str, value: str) -> None:
        """One tag on the pinned version (e.g. where the search index built for it is)."""
        if self.registered:
            client(self.tracking_uri).set_model_version_tag(self.name, self._version(), key, str(value))

    def load(self, device: str = "cpu") -> Any:
        """The recipe's inference object (preprocessing included) of exactly this reference's model."""
        if self.tracking_uri is None:
            return load_inference(self.uri, device)
        import mlflow
        from mlflow.exceptions import MlflowException

        uri = f"models:/{self.name}/{self._version()}" if self.registered else self.uri
        # MLflow looks models:/ (and a logged model's source) up with its global client, whatever
        # download_artifacts is told: point it at this reference's store
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=self.tracking_uri)
        except MlflowException as e:
            if self.registered:
                raise self._lookup_error(client(self.tracking_uri), e) from None
            raise ModelLookupError(f"{self.uri}: cannot download it from {self.tracking_uri} ({_first_line(e)})") from None
        return load_inference(local, device)

    def _version(self) -> str:
        if self.version is None:
            raise ModelLookupError(f"{self.uri}: not resolved to a version yet (ModelRef.resolve)")
        return self.version

    def _lookup_error(self, c: Any, e: Exception) -> ModelLookupError:
        """Why a registry call for this reference failed, in one line: no such registered model, no
        such alias / version, or (when both exist) MLflow's own first line."""
        from mlflow.exceptions import MlflowException

        try:
            c.get_registered_model(self.name)
        except MlflowException as missing:
            if getattr(missing, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                return ModelLookupError(f"{self.uri}: {_first_line(missing)} (tracking URI {self.tracking_uri})")
            known = [r.name for r in c.search_registered_models(max_results=50)]
            return ModelLookupError(f"{self.uri}: no registered model {self.name!r} at {self.tracking_uri} "
                                    f"(registered: {', '.join(known) or 'none'})")
        try:
            if self.version is None:
                c.get_model_version_by_alias(self.name, self.alias)
            else:
                c.get_model_version(self.name, self.version)
        except MlflowException:
            what = f"alias {self.alias!r}" if self.version is None else f"version {self.version}"
            return ModelLookupError(f"{self.uri}: registered model {self.name!r} has no {what} at {self.tracking_uri}")
        return ModelLookupError(f"{self}: {_first_line(e)} (tracking URI {self.tracking_uri})")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve(text: str, tracking_uri: str | None = None) -> ModelRef:
    """``text`` parsed and pinned (:meth:`ModelRef.parse`, then :meth:`ModelRef.resolve`)."""
    return ModelRef.parse(text, tracking_uri).resolve()


def load_model(text: str, tracking_uri: str | None = None, device: str = "cpu") -> Any:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a local checkpoint path ->
    the recipe's inference object (the alias is resolved once: the version loaded is one version)."""
    return resolve(text, tracking_uri).load(device)


def checkpoint_url(text: str, tracking_uri: str | None = None) -> str:
    """A reference as the checkpoint it names, for a config key that a worker loads itself
    (``rdan.shortlist_model``): ``models:/`` pinned now to its version's registered checkpoint
    (the ``checkpoint`` tag its registration wrote), a path or URL as it is."""
    ref = ModelRef.parse(text, tracking_uri)
    if not ref.registered:
        if ref.uri.startswith("runs:/"):
            raise ModelLookupError(f"{text}: name a registered model (models:/...) or a checkpoint path or URL")
        return ref.uri
    pinned = ref.resolve()
    url = pinned.tags().get("checkpoint")
    if not url:
        raise ModelLookupError(f"{pinned}: the version has no 'checkpoint' tag (not registered by xray_match)")
    return url


def load_inference(path: str, device: str = "cpu") -> Any:
    """A checkpoint folder or file -> the recipe's inference object."""
    from xray_match.train import checkpoint

    try:
        return checkpoint.load_inference(path, device)
    except checkpoint.CheckpointError as e:
        raise ModelLookupError(str(e)) from None
