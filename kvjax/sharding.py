"""Many devices: one mesh, decided here, over which every command splits its batch.

    mesh = sharding.make_mesh(devices)                 # None: every device; N: the first N
    fn = sharding.per_device(fn, mesh, in_specs, out_specs)
    params = sharding.replicate(params, mesh)

kvjax's sequences are independent rows, so the mesh has one axis, `data`, and a batch is split by
rows: each device runs the single-device program (jax.shard_map) on its share, with the model's
parameters replicated, and the only value the devices exchange is the decode loop's "every row is
done" (`every`). Inside each device the program is the one-device program, so the C++ and Pallas
kernels need no partitioning rules, and a row's results do not depend on the device it ran on.
The row axis of each cache leaf is found from the leaf's shapes at two batch sizes (`row_specs`):
the cache pytree has no sharding code of its own. On a mesh of one device `per_device`,
`replicate` and `place` return their input: one device runs exactly as before.

Several hosts (a TPU pod slice, a multi-GPU cluster): `initialize()` joins them through
`jax.distributed.initialize()` when the environment names a coordinator, and the mesh then spans
every host's devices.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kvjax.errors import KvjaxError

DATA = "data"  # the mesh axis that rows (sequences, examples, segments) are split over
ROWS = P(DATA)  # an array split by its first axis
REPLICATED = P()
COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0, with JAX_NUM_PROCESSES and JAX_PROCESS_ID


def initialize() -> bool:
    """Joins the other processes of a multi-host run, before anything touches a device: when
    `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are set, with them; when
    `KVJAX_DISTRIBUTED=1`, as jax.distributed finds its cluster (a TPU pod slice, SLURM, Open MPI).
    -> whether it joined."""
    if os.environ.get(COORDINATOR):
        try:
            count, index = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise KvjaxError(f"{COORDINATOR} is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID (whole numbers) "
                             "beside it") from None
        jax.distributed.initialize(os.environ[COORDINATOR], count, index)
        return True
    if os.environ.get("KVJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def make_mesh(devices: int | None = None) -> Mesh:
    """A mesh with one `data` axis over the first `devices` devices (None: all, on every host)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if n > len(available):
        raise KvjaxError(f"--devices {n}: this machine has {len(available)} {available[0].platform} device(s)")
    return Mesh(np.asarray(available[:n]), (DATA,))


def describe(mesh: Mesh | None) -> str:
    """`8 cpu devices`, for a stats line."""
    devices = mesh.devices.ravel() if mesh is not None else jax.devices()[:1]
    return f"{len(devices)} {devices[0].platform} device{'s' if len(devices) > 1 else ''}"


def size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.size


def padded(rows: int, mesh: Mesh | None) -> int:
    """`rows` rounded up to a multiple of the mesh's devices (each device takes as many)."""
    n = size(mesh)
    return -(-rows // n) * n


def row_specs(make: Callable[[int], Any]):
    """PartitionSpecs splitting each leaf of make(batch) by its row axis: the one axis whose size
    doubles from batch 1 to batch 2 (a leaf with none, e.g. a step counter, is replicated)."""
    one, two = jax.eval_shape(lambda: make(1)), jax.eval_shape(lambda: make(2))

    def spec(a, b):
        axes = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(axes) > 1 or any(b.shape[i] != 2 * a.shape[i] for i in axes):
            raise ValueError(f"a leaf of shape {a.shape} at batch 1 and {b.shape} at 2 has no single row axis")
        return P(*[None] * axes[0], DATA) if axes else REPLICATED

    return jax.tree.map(spec, one, two)


def per_device(fn: Callable, mesh: Mesh | None, in_specs, out_specs) -> Callable:
    """fn run by every device of the mesh on its share of the rows (in_specs / out_specs: as
    jax.shard_map takes them); fn itself on one device."""
    if size(mesh) == 1:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def every(flag, mesh: Mesh | None):
    """Whether `flag` (a bool scalar, per device inside `per_device`) holds on every device."""
    if size(mesh) == 1:
        return flag
    return jax.lax.pmin(flag.astype(np.int32), DATA).astype(bool)


def _each_leaf(fn, tree, mesh: Mesh, specs):
    """fn(leaf, its NamedSharding) over `tree`, whose layout `specs` gives as a prefix of it."""
    return jax.tree.map(lambda spec, sub: jax.tree.map(lambda x: fn(x, NamedSharding(mesh, spec)), sub),
                        specs, tree, is_leaf=lambda s: isinstance(s, P))


def place(tree, mesh: Mesh | None, specs):
    """The arrays of `tree` laid out on the mesh as `specs` (a prefix of the tree) say; on one
    device, `tree` itself."""
    if size(mesh) == 1:
        return tree
    return _each_leaf(jax.device_put, tree, mesh, specs)


def shapes_on(tree, mesh: Mesh | None, specs):
    """The shapes of `tree`'s arrays with the layout `specs` gives them on the mesh (for lowering a
    program before its inputs exist); on one device, `tree` itself."""
    if size(mesh) == 1:
        return tree
    return _each_leaf(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, mesh, specs)


def replicate(tree, mesh: Mesh | None):
    """A copy of `tree` on every device of the mesh (no copy where it already is)."""
    return place(tree, mesh, REPLICATED)


def gather(x) -> np.ndarray:
    """The whole of array x on this host (numpy), also where other hosts hold parts of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def create(make: Callable[[], Any], mesh: Mesh | None, specs):
    """make() (e.g. an empty cache) built directly in its layout on the mesh: no device ever holds
    the whole of it."""
    if size(mesh) == 1:
        return make()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
    return jax.jit(make, out_shardings=shardings)()
