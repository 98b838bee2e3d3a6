"""One process of the data-parallel tests (``tests/test_distributed.py``), started by them with
torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set; not a test module.

``python -m tests._distributed_worker TASK OUT_DIR``: TASK is ``fit`` (CellBench, results saved as
``OUT_DIR/rank<r>.pt``), ``kill`` (rank 1 kills itself in epoch 4; every rank writes what it raised
to ``OUT_DIR/error<r>.txt``) or ``transform``.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import torch

#: the settings of the 'fit' task (the test fits the same in one process)
EPOCHS = 15
FIT = {"guide_epochs": 5}
# no reference starts: the one- and two-process fits differ by float summation order, and the training
# representations they would start from amplify that into different starts for a few query cells
TRANSFORM = {"max_epochs": 20, "n_reference": 0}


def main(task: str, out: Path) -> None:
    torch.set_num_threads(1)
    import dgdcell
    from dgdcell.module import DGDModule

    rank = int(os.environ["RANK"])
    if task == "fit":
        adata = dgdcell.datasets.cellbench()
        model = dgdcell.DGD(n_components=5, seed=0, device="cpu")
        model.fit(adata, max_epochs=EPOCHS, verbose=False, **FIT)
        query = dgdcell.datasets.cellbench()[::4].copy()
        model.transform(query, verbose=False, **TRANSFORM)
        torch.save({"history": model.history, "z": model.representation, "query_z": torch.tensor(query.obsm["X_dgd"]),
                    "query_history": dict(query.uns["dgd"]["transform"]["history"]),
                    "cluster": torch.tensor(adata.obs["dgd_cluster"].cat.codes.to_numpy()),
                    "module": model.module.state_dict(), "fit_settings": model.fit_settings}, out / f"rank{rank}.pt")
    elif task == "kill":
        from tests.conftest import make_counts

        calls = {"n": 0}
        loss = DGDModule.loss

        def dying_loss(self, *args, **kwargs):  # rank 1 dies in the middle of epoch 4
            calls["n"] += 1
            if rank == 1 and calls["n"] == 3 * 2 + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return loss(self, *args, **kwargs)

        DGDModule.loss = dying_loss
        adata = make_counts(n_per_group=(60, 50, 40), n_genes=40)
        model = dgdcell.DGD(n_components=3, latent_dim=3, seed=0, device="cpu")
        try:
            model.fit(adata, max_epochs=50, batch_size=128, train_size=1.0, guide_epochs=0, verbose=False,
                      checkpoint_dir=out / "ckpt", checkpoint_every=1)
            (out / f"error{rank}.txt").write_text("no error")
        except BaseException as err:  # the test reads what each rank raised
            (out / f"error{rank}.txt").write_text(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
            raise
    else:
        raise SystemExit(f"unknown task {task!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
