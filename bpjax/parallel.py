r"""Data parallelism with JAX's own sharding: one mesh axis ``data`` over the devices.

The batch of M samples is split into D equal shards of M/D rows, one per device
of the mesh ``jax.make_mesh((D,), ("data",))``; parameters and optimizer state
are replicated on every device. The forward pass and the error recursion (7.1),
(7.2) are row-local (second document, section 0.3: samples never interact), so
each device runs them on its own rows with no communication. Only the sums over
samples of section 6 cross devices:

    (6.1) dC/dW^l = Σ_m dC/dZ^l_m (A^{l-1}_m)^T = Σ_d Σ_{m ∈ shard d} dC/dZ^l_m (A^{l-1}_m)^T
    (6.2) dC/db^l = Σ_m dC/dZ^l_m                = Σ_d Σ_{m ∈ shard d} dC/dZ^l_m

the inner sum local to device d, the outer one an all-reduce over ``data``.
Two forms produce that all-reduce, and the tests prove them equal to each other
and to one device:

* ``sharding``: the train step is ordinary single-device code; the batch is
  annotated ``P("data")`` (``shard_rows``) and the parameters ``P()``. XLA's
  partitioner sees that ``dZ.T @ A`` contracts over the sharded sample axis and
  inserts the all-reduce itself; it appears in the compiled HLO, not in the code.
* ``shard_map``: :func:`sharded_manual_grad` writes the per-device program by
  hand: the section 7 formulas on the local rows, then ``lax.psum(..., "data")``
  for the outer Σ_d of (6.1) and (6.2), visible in the code.

The mesh axis is ``AxisType.Auto``: ``with_sharding_constraint`` annotations
are hints the partitioner propagates, the classic ``jit`` data parallelism.
jax 0.10's ``make_mesh`` defaults to ``Explicit`` axes, where shardings are
part of every array's type and ``with_sharding_constraint`` is refused ("can
only refer to Auto axes"; the batch gather would need ``jax.sharding.reshard``).

Multi-host: every process runs the same program (``jax.distributed.initialize``
first, see :func:`initialize_distributed`); the mesh spans the devices of all
processes. Each process loads the whole (small) dataset and puts a copy on each
of its devices (:func:`replicate`, from identical host copies); all processes
draw the same permutation from the same key, and each device gathers only its
own rows of every batch, so a process reads just its slice of each batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bpjax.errors import ConfigError, first_line
from bpjax.formulas import manual_grad_and_output
from bpjax.losses import wide_dtype
from bpjax.methods import grad_fn
from bpjax.network import Net, Params
from bpjax.rules import Rule
from bpjax.validation import check_batch_divides

if TYPE_CHECKING:
    from bpjax.config import Config

Array = jax.Array
DATA = "data"  # the mesh axis the batch is split along


def make_data_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (Auto axis type: see the module docstring)."""
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: parameters, optimizer state, the dataset."""
    return NamedSharding(mesh, P())


def row_sharded(mesh: Mesh) -> NamedSharding:
    """Rows (samples) split over ``data``: device d holds rows [d M/D, (d+1) M/D)."""
    return NamedSharding(mesh, P(DATA))


def shard_rows(a: Array, mesh: Mesh) -> Array:
    """Inside ``jit``: annotate ``a: (M, ...)`` as split by rows over ``data``."""
    return lax.with_sharding_constraint(a, row_sharded(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (identical in every process) -> global arrays replicated over ``mesh``.

    ``make_array_from_callback`` places only this process's copies, so the same
    call works with one process or many (``jax.device_put`` to devices of other
    processes does not).
    """
    sharding = replicated(mesh)

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's arrays live: one device, or a mesh ``("data",)`` over several.

    ``mesh is None`` is the single-device run: nothing is sharded and the
    compiled program is the plain single-device one (no sharding annotations).
    With a mesh, data, parameters and optimizer state are replicated on every
    device and each batch is split by rows (``shard_rows``). ``form`` is the
    data-parallel form of the gradient: ``"sharding"`` or ``"shard_map"``.
    """

    device: jax.Device  # the first device: where single-device arrays live
    mesh: Mesh | None = None
    form: str = "sharding"

    @classmethod
    def for_config(cls, config: Config) -> Placement:
        """The placement ``config`` asks for, checked against the devices JAX sees.

        One-line ConfigError when the devices are too few, the batch does not
        divide over them, or the processes are not those the config names.
        """
        backend_devices()  # a backend JAX cannot start: one line, here
        check_processes(config.num_processes)
        if config.num_devices == 1 and config.num_processes == 1:
            return cls(select_devices(config.platform, 1)[0])
        devices = select_devices(config.platform, config.num_devices, config.num_processes)
        if not config.num_devices:  # --num_devices=0 (all): the count is known only now
            check_batch_divides(
                config.batch, len(devices),
                over=f"the {len(devices)} devices of --num_devices=0 (all)",
            )  # fmt: skip
        if len(devices) == 1:  # --num_devices=0 on a one-device host
            return cls(devices[0])
        return cls(devices[0], make_data_mesh(devices), config.parallel)

    @property
    def is_main(self) -> bool:
        """Process 0: the one that logs and writes files."""
        return jax.process_index() == 0

    def put(self, tree: Any) -> Any:
        """Host values -> arrays on the device, or replicated over the mesh."""
        if self.mesh is None:
            return jax.device_put(tree, self.device)
        return replicate(tree, self.mesh)

    def put_restored(self, tree: Any) -> Any:
        """A restored checkpoint onto the device (Orbax restores a mesh's layout itself)."""
        return jax.device_put(tree, self.device) if self.mesh is None else tree

    def shard_rows(self, a: Array) -> Array:
        """Inside ``jit``: split ``a: (M, ...)`` by rows over the mesh; no-op on one device."""
        return a if self.mesh is None else shard_rows(a, self.mesh)

    def everywhere(self, a: Array) -> Array:
        """Inside ``jit``: keep ``a`` whole on every device (e.g. the epoch's permutation,
        which every device indexes); no-op on one device."""
        return a if self.mesh is None else lax.with_sharding_constraint(a, replicated(self.mesh))

    def describe(self) -> str:
        """E.g. ``cpu (cpu)`` or ``8 x cpu (cpu), data parallel by sharding``."""
        where = f"{self.device.device_kind} ({self.device.platform})"
        if self.mesh is None:
            return where
        processes = jax.process_count()
        return f"{self.mesh.size} x {where}, data parallel by {self.form}" + (
            f" over {processes} processes" if processes > 1 else ""
        )


def sharded_manual_grad(
    net: Net, mesh: Mesh, *, rule: str | Rule = "bp"
) -> Callable[..., tuple[Params, Array]]:
    """``manual_grad`` as an explicit per-device program: local Σ, then ``psum``.

    Returns ``(params, x: (M, n_0), y: (M, n_L), feedback=(), key=None) -> (grads,
    outputs)``, the same contract as ``methods.grad_fn(net, "manual")``: ``grads`` (replicated) is
    the gradient of the batch-mean loss over all M samples (``rule``'s update);
    ``outputs: (M, n_L)`` is Z^L, split by rows like ``x``. M must divide by the
    mesh size.
    """

    def per_device(params: Params, x_m: Array, y_m: Array, feedback,
                   key) -> tuple[Params, Array]:  # fmt: skip
        # Section 7 on this device's M/D rows (x_m), with no communication: the
        # forward pass and the error recursion are row-local. It returns their mean,
        # (D/M) Σ_{m ∈ d} dZ^l_m (A^{l-1}_m)^T.
        local_mean, z_m = manual_grad_and_output(
            net, params, x_m, y_m, rule=rule, feedback=feedback, key=key
        )
        m_local = x_m.shape[0]
        m_global = m_local * lax.axis_size(DATA)

        def section_6_sum(g: Array) -> Array:
            # (6.1) dW^l = (1/M) Σ_d Σ_{m ∈ d} dZ^l_m (A^{l-1}_m)^T, (6.2) db^l likewise:
            # each device's sum over its rows, summed over the devices by psum.
            # (summed in at least float32: a bfloat16 step's grads are upcast first).
            return lax.psum(g.astype(wide_dtype(g.dtype)) * m_local, DATA) / m_global

        return jax.tree.map(section_6_sum, local_mean), z_m

    return _with_feedback(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(DATA), P(DATA), P(), P()),
        out_specs=(P(), P(DATA)),
    ))  # fmt: skip


def _with_feedback(fn: Callable) -> Callable[..., tuple[Params, Array]]:
    """``fn(params, x, y, feedback, key)`` callable as ``fn(params, x, y)`` too (no state)."""
    return lambda params, x, y, feedback=(), key=None: fn(params, x, y, feedback, key)


def sharded_grad_fn(
    net: Net, method: str, mesh: Mesh, *, rule: str | Rule = "bp"
) -> Callable[..., tuple[Params, Array]]:
    """The ``shard_map`` form of ``methods.grad_fn(net, method, rule=rule)``: same contract.

    ``manual`` gets the explicit section 6 ``psum`` (:func:`sharded_manual_grad`);
    every other method the generic local-mean-then-``pmean`` (:func:`sharded_grad`).
    The feedback matrices are replicated, like the parameters.
    """
    if method == "manual":
        return sharded_manual_grad(net, mesh, rule=rule)
    return sharded_grad(grad_fn(net, method, rule=rule), mesh)


def sharded_grad(grad: Callable[..., tuple[Params, Array]], mesh: Mesh) -> Callable[..., tuple]:
    """Any gradient method in the ``shard_map`` form: the local mean, then ``pmean``.

    ``grad`` returns the gradient of its rows' mean loss. With D equal shards of
    M/D rows, (1/M) Σ_m g_m = (1/D) Σ_d (D/M) Σ_{m ∈ shard d} g_m: the mean over
    devices of the local means, which is ``lax.pmean``.

    The parameters are first cast to device-varying: under ``shard_map``'s
    replication checking, ``jax.grad`` with respect to a replicated (invariant)
    input already sums over devices (the transpose of the implicit invariant ->
    varying cast is a psum), and a pmean after it would count every device D
    times. Cast, every method returns its local gradient, and the one reduction
    is the explicit pmean.
    """

    def per_device(params: Params, x_m: Array, y_m: Array, feedback,
                   key) -> tuple[Params, Array]:  # fmt: skip
        params = lax.pcast(params, DATA, to="varying")  # local grads, no implicit psum
        local, outputs = grad(params, x_m, y_m, feedback, key)
        return jax.tree.map(lambda g: lax.pmean(g, DATA), local), outputs

    return _with_feedback(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P(DATA), P(DATA), P(), P()),
        out_specs=(P(), P(DATA)),
    ))  # fmt: skip


# What to install for each platform (JAX's own extras).
INSTALL_HINT = {
    "cpu": "pip install jax",
    "gpu": "for NVIDIA GPUs pip install 'jax[cuda13]' (CUDA 13) or 'jax[cuda12]' (CUDA 12)",
    "tpu": "on a TPU VM pip install 'jax[tpu]'",
}


def backend_devices() -> list[jax.Device]:
    """``jax.devices()``, or a one-line ConfigError when JAX cannot start its backend.

    A ``--jax_platforms`` (``JAX_PLATFORMS``) naming a backend whose plugin is
    missing makes JAX raise a bare AssertionError or a long RuntimeError.
    """
    try:
        return jax.devices()
    except (RuntimeError, AssertionError) as e:
        asked = jax.config.jax_platforms or "the default backend"
        gpu = any(p in asked for p in ("cuda", "rocm", "gpu"))
        hint = INSTALL_HINT["gpu" if gpu else "tpu" if "tpu" in asked else "cpu"]
        first = first_line(e, 160, otherwise="its plugin is not installed")
        raise ConfigError(
            f"--jax_platforms={asked}: JAX cannot start that backend ({first}); {hint}, or"
            " drop --jax_platforms to let JAX pick what it finds"
        ) from None


def select_devices(
    platform: str | None, num_devices: int, num_processes: int = 1
) -> list[jax.Device]:
    """The devices of the data-parallel mesh; ``num_devices=0`` takes them all.

    With several processes every process contributes ``num_devices /
    num_processes`` of its own devices (the first ones), so that each holds an
    equal part of every batch.
    """
    found = sorted({d.platform for d in backend_devices()})
    try:
        devices = jax.devices(platform) if platform else jax.devices()
    except RuntimeError:
        raise ConfigError(
            f"--platform={platform}: JAX finds no {platform} device (it has: {', '.join(found)});"
            f" {INSTALL_HINT[platform]}"
        ) from None
    n = num_devices or len(devices)
    if n > len(devices):
        kind = devices[0].platform
        hint = (
            f"on a CPU host, simulate {n} devices with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}"
            if kind == "cpu"
            else "lower --num_devices, or use --num_devices=0 for all of them"
        )
        raise ConfigError(
            f"--num_devices={n} but JAX sees {len(devices)} {kind} device"
            f"{'s' if len(devices) != 1 else ''}: {hint}"
        )
    if num_processes == 1:
        return list(devices[:n])
    per_process = n // num_processes
    chosen = []
    for p in range(num_processes):
        own = [d for d in devices if d.process_index == p]
        if len(own) < per_process:
            raise ConfigError(
                f"--num_devices={n} over --num_processes={num_processes} needs {per_process}"
                f" devices in every process, but process {p} has {len(own)}"
            )
        chosen += own[:per_process]
    return chosen


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How this process joins a multi-process run: launcher arguments, not run settings.

    They name this host and this process, so they are not recorded with the
    run: the same run can be resumed from other hosts or another process layout.
    Without ``coordinator_address`` JAX detects the cluster (TPU pod slices,
    SLURM, Open MPI).
    """

    coordinator_address: str | None = dataclasses.field(
        default=None,
        metadata={"help": "HOST:PORT of process 0, for --num_processes > 1 (default: detected)."},
    )
    process_id: int = dataclasses.field(
        default=0, metadata={"help": "This process's index in [0, num_processes)."}
    )

    def check(self, num_processes: int) -> None:
        """One-line ConfigError when these arguments do not fit ``num_processes``."""
        if isinstance(self.process_id, bool) or not isinstance(self.process_id, int) or not (
            0 <= self.process_id < num_processes
        ):
            raise ConfigError(
                f"--process_id must be in [0, --num_processes={num_processes}), got "
                f"{self.process_id!r}"
            )
        if num_processes == 1 and self.coordinator_address is not None:
            raise ConfigError(
                "--coordinator_address needs --num_processes > 1: the number of processes"
                " that train together"
            )
        if num_processes > 1 and self.coordinator_address is None and self.process_id:
            raise ConfigError(
                "--process_id needs --coordinator_address (without it, JAX takes the process"
                " ids from the cluster environment)"
            )


def initialize_distributed(cluster: Cluster, num_processes: int) -> None:
    """``jax.distributed.initialize`` for a multi-process run; call before any other JAX use.

    With ``cluster.coordinator_address`` the cluster is given explicitly (any
    machines, localhost included); without it, JAX detects the coordinator and
    this process's id from the environment (TPU pod slices, SLURM, Open MPI).
    On CPU the cross-process collectives use gloo.
    """
    cluster.check(num_processes)
    if num_processes <= 1 or jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address, process_id = cluster.coordinator_address, cluster.process_id
    try:
        if address is None:
            jax.distributed.initialize(num_processes=num_processes)
        else:
            jax.distributed.initialize(address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:  # jax's errors are long; keep their first line
        raise ConfigError(
            f"process {process_id} could not join the {num_processes}-process run at "
            f"{address or 'the detected coordinator'}: {first_line(e, None)}"
        ) from None


def check_processes(num_processes: int) -> None:
    """A one-line error when the run expects more processes than JAX is connected to."""
    if jax.process_count() != num_processes:
        raise ConfigError(
            f"--num_processes={num_processes} but JAX runs {jax.process_count()} process"
            f"{'es' if jax.process_count() != 1 else ''}: call "
            "bpjax.parallel.initialize_distributed (launch.py does) before any other JAX call"
        )

