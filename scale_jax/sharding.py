"""The device mesh and the logical-axis rules that map model dimensions onto it (MaxText style).

Every parameter and activation names its dimensions with the logical axes below; changing the
parallelism is a change to the mesh sizes in the config (or to these rules), never to the model.
"""
import jax
import numpy as np
from flax import linen as nn
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


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Mesh over `devices` (default: all) with sizes from config; one size may be -1 (the rest)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if devices.size % known:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not divide {devices.size} devices')
    sizes[sizes.index(-1)] = devices.size // known
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, '
                     f'there are {devices.size}')
  return Mesh(devices.reshape(sizes), MESH_AXES)


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
