"""Batch norm of a Dask array chunked along the batch, computed on a dask.distributed cluster:
the statistics are those of the whole array, and the call itself computes nothing.

    python docs/examples/dask_cluster.py
"""

import sys

import dask
import dask.array as da
import numpy as np
from dask.distributed import Client, LocalCluster

import portable_bn as pbn


def main() -> int:
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(64, 8, 16, 16))
    mask = rng.random((64, 16, 16)) < 0.8
    x = da.from_array(data, chunks=(16, 8, 16, 16))  # 4 chunks along the batch: 4 tasks per pass
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        result = pbn.batch_norm(
            x, da.zeros(8), da.ones(8), training=True, mask=da.from_array(mask, chunks=(16, 16, 16))
        )
        output, running_var = dask.compute(result.output, result.running_var)  # on the cluster's workers
    expected = pbn.batch_norm(data, np.zeros(8), np.ones(8), training=True, mask=mask)
    output_error = float(np.abs(output - expected.output).max())
    variance_error = float(np.abs(running_var - expected.running_var).max())
    print(f"output differs from NumPy's by {output_error:.1e}, running_var by {variance_error:.1e}")
    return 0 if max(output_error, variance_error) < 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
