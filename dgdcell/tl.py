"""Scanpy-style function entry points."""

from __future__ import annotations

from .model import DGD


def dgd(adata, n_components: int | None = None, latent_dim: int = 20, covariate_keys=None, label_key=None,
        seed: int = 0, layer: str | None = None, max_epochs: int | None = None, key_added: str = "dgd",
        copy: bool = False, return_model: bool = False, **kwargs):
    """Fit a :class:`~dgdcell.DGD` and write its outputs into ``adata`` (scanpy style).

    Parameters
    ----------
    adata
        AnnData (or MuData) with raw counts in ``.X`` or ``.layers[layer]``.
    n_components
        Number of mixture components (clusters); default 10, or the number of
        classes of ``label_key``.
    latent_dim
        Dimension of each cell's representation.
    covariate_keys
        ``adata.obs`` columns modelled as covariates (batch, donor, ...).
    label_key
        ``adata.obs`` column of known labels (semi-supervised mixture).
    seed
        Random seed.
    layer
        Read the counts from ``adata.layers[layer]`` instead of ``.X``.
    max_epochs
        Epoch cap (default: by data size; early stopping usually ends sooner).
    key_added
        Prefix of the keys written (default ``'dgd'``).
    copy
        Work on a copy of ``adata`` and return it.
    return_model
        Return the fitted model.
    **kwargs
        Passed to ``DGD(...)`` when it takes them (``covariance_type``,
        ``likelihood``, ``device``, ...), else to :meth:`DGD.fit`
        (``batch_size``, ``train_size``, ``patience``, ``verbose``, ...).

    Returns
    -------
    None, AnnData, DGD or (AnnData, DGD)
        The modified copy when ``copy=True``, the fitted model when
        ``return_model=True`` (both: ``(adata, model)``), else None.

    Notes
    -----
    Reads the counts and the obs columns ``covariate_keys`` and ``label_key``.
    Writes, as :meth:`DGD.fit` (keys renamed by ``key_added``):
    ``obsm['X_dgd']``, ``obs['dgd_cluster']``, ``obsm['X_dgd_cluster_probs']``,
    one ``obsm['X_dgd_<covariate>']`` per covariate and ``uns['dgd']``.

    Examples
    --------
    >>> adata = dgdcell.datasets.cellbench()
    >>> dgdcell.tl.dgd(adata, n_components=5, covariate_keys=["batch"])
    >>> adata.obs["dgd_cluster"].nunique()
    5
    """
    import inspect

    init_names = set(inspect.signature(DGD.__init__).parameters)
    init_kw = {k: v for k, v in kwargs.items() if k in init_names}
    fit_kw = {k: v for k, v in kwargs.items() if k not in init_names}
    target = adata.copy() if copy else adata
    model = DGD(latent_dim=latent_dim, n_components=n_components, covariate_keys=covariate_keys,
                label_key=label_key, seed=seed, **init_kw)
    model.fit(target, max_epochs=max_epochs, layer=layer, key_added=key_added, **fit_kw)
    if copy and return_model:
        return target, model
    if copy:
        return target
    return model if return_model else None


def evidence_curve(adata, n_components=None, key_added: str = "dgd", **kwargs):
    """Fit a :class:`~dgdcell.DGD` with K chosen by the evidence; return the evidence curve over K.

    The same as ``DGD(n_components=candidates, ...).fit(adata)``: writes the
    outputs of :meth:`DGD.fit` with the chosen K, and the curve into
    ``uns[key_added]["n_components"]``. Labels are never used.

    Parameters
    ----------
    adata
        AnnData (or MuData) with raw counts.
    n_components
        Candidate numbers of components (default ``'auto'``: 2..20).
    key_added
        Prefix of the keys written (default ``'dgd'``).
    **kwargs
        Passed to ``DGD(...)`` when it takes them (``latent_dim``,
        ``posterior``, ``seed``, ...), else to :meth:`DGD.fit`.

    Returns
    -------
    pandas.DataFrame
        One row per candidate: ``n_components``, ``log_evidence`` (nats
        per cell, see :meth:`dgdcell.DGD.select_n_components`), ``se`` and ``chosen``.
    """
    import inspect

    init_names = set(inspect.signature(DGD.__init__).parameters) - {"n_components"}
    init_kw = {k: v for k, v in kwargs.items() if k in init_names}
    fit_kw = {k: v for k, v in kwargs.items() if k not in init_names}
    return DGD(**init_kw).select_n_components(adata, "auto" if n_components is None else n_components,
                                              key_added=key_added, **fit_kw)
