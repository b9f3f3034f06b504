"""The device mesh and the logical-axis rules that map model dimensions onto it (MaxText style).

Every parameter and activation names its dimensions with the logical axes below; changing the
parallelism is a change to the mesh sizes in the config (or to these rules), never to the model.
"""
import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Ordered: a logical axis takes the first rule whose mesh axes are not already used by another
# dimension of the same array (so activations keep 'embed' whole when 'batch' took 'fsdp').
LOGICAL_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),  # parameters: FSDP shards the model width
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('length', None),
    ('patch', None),
    ('modality', None),
    ('layers', None),  # the stacked-layer axis of scanned encoders
)


def mesh_sizes(mesh_config, num_devices: int) -> list:
  """[data, fsdp, tensor] over all devices, the one -1 (if any) taking the devices left over."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'there are {num_devices}')
  return sizes


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The mesh of `devices` (default: all) with the config's sizes, laid onto the hardware.

  mesh.data, mesh.fsdp and mesh.tensor are the sizes over all devices (one may be -1: the rest).
  mesh.dcn_data, dcn_fsdp and dcn_tensor (default 1) say how many of each axis's positions lie
  in different slices (TPU) or hosts (GPU, CPU): such an axis crosses the slow data-centre
  network, the rest of it stays on the chips' own interconnect. Within a slice the devices are
  placed by their physical coordinates (mesh_utils.create_device_mesh), so that neighbours on an
  axis are neighbours on the torus; CPU devices keep their order.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(mesh_config, len(devices))
  dcn = [int(mesh_config.get(f'dcn_{a}', 1)) for a in MESH_AXES]
  if any(d < 1 or size % d for d, size in zip(dcn, sizes)):
    raise ValueError(f'mesh dcn sizes {dict(zip(MESH_AXES, dcn))} must divide the axis sizes '
                     f'{dict(zip(MESH_AXES, sizes))}')
  # Slices are granules on TPU; elsewhere (GPU and CPU hosts) each process is one.
  by_process = not hasattr(devices[0], 'slice_index')
  granules = len({d.process_index if by_process else d.slice_index for d in devices})
  spanned = int(np.prod(dcn))  # granules the mesh spans
  if spanned not in (1, granules):
    kind = ('process', 'processes') if by_process else ('slice', 'slices')
    raise ValueError(
        f'mesh dcn sizes {dict(zip(MESH_AXES, dcn))} multiply to {spanned}, but the '
        f'devices lie in {granules} {kind[granules > 1]}: the dcn sizes must multiply to that '
        f'number (or all be 1), e.g. --config.mesh.dcn_data={granules}')
  if spanned > 1:
    within = [size // d for size, d in zip(sizes, dcn)]
    array = mesh_utils.create_hybrid_device_mesh(within, dcn, devices,
                                                 process_is_granule=by_process,
                                                 allow_split_physical_axes=True)
  elif devices[0].platform == 'cpu':
    array = np.asarray(devices).reshape(sizes)
  else:
    array = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  return Mesh(array, MESH_AXES)


def processes_split_by(mesh: Mesh, axis: str):
  """A group of devices along `axis` (the others fixed) that spans several processes, as (the
  group's process indices); None when every such group lies within one process."""
  devices = np.moveaxis(mesh.devices, MESH_AXES.index(axis), -1).reshape(-1, mesh.shape[axis])
  for group in devices:
    processes = sorted({d.process_index for d in group})
    if len(processes) > 1:
      return processes
  return None


def logical_sharding(mesh: Mesh, logical_axes) -> NamedSharding:
  """NamedSharding of an array whose dimensions have these logical names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, LOGICAL_RULES))


def tree_shardings(mesh: Mesh, abstract_tree):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract arrays.
  Leaves without logical names are replicated."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, LOGICAL_RULES)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, batch) -> dict:
  """Every batch array is split along its leading (batch) dimension."""
  return jax.tree.map(
      lambda x: logical_sharding(mesh, ('batch',) + (None,) * (np.ndim(x) - 1)), batch)


def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (the most
  any device holds: shards of uneven splits differ)."""
  total = 0
  for x in jax.tree.leaves(abstract_tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total
