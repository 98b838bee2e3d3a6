"""Scanpy-style function entry points."""

from __future__ import annotations

from .model import DGD


def dgd(adata, n_components: int | None = None, latent_dim: int = 20, covariate_keys=None, label_key=None,
        seed: int = 0, layer: str | None = None, max_epochs: int | None = None, key_added: str = "dgd",
        copy: bool = False, return_model: bool = False, **kwargs):
    """Fit a :class:`~dgdcell.DGD` and write its outputs into ``adata`` (scanpy style).

    Reads raw counts from ``adata.X`` or ``adata.layers[layer]``. Writes
    ``obsm['X_dgd']``, ``obs['dgd_cluster']``, ``obsm['X_dgd_cluster_probs']``,
    one ``obsm['X_dgd_<covariate>']`` per covariate and ``uns['dgd']`` (keys
    renamed by ``key_added``). Other keyword arguments go to ``DGD(...)`` when it
    takes them, else to ``DGD.fit``.

    Returns the modified copy when ``copy=True``, the fitted model when
    ``return_model=True`` (both: ``(adata, model)``), else None.
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
