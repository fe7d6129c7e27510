"""Mesh construction, the logical-axis rules and sharded initialisation on 8 fake CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from calm import sharding
from calm.config import MeshConfig
from calm.errors import ConfigError


def _param(key, shape, names, scale=0.02):
  return nnx.Param(scale * jax.random.normal(key, shape), out_sharding=names, eager_sharding=False)


class Block(nnx.Module):
  def __init__(self, d: int, f: int, rngs: nnx.Rngs):
    self.norm = nnx.Param(jnp.ones((d,)), out_sharding=("norm",), eager_sharding=False)
    self.up = _param(rngs.params(), (d, f), ("embed", "mlp"))
    self.down = _param(rngs.params(), (f, d), ("mlp", "embed"))

  def __call__(self, x):
    h = x * self.norm[...]
    return x + jax.nn.silu(h @ self.up[...]) @ self.down[...]


class Toy(nnx.Module):
  """A small LM-shaped module using every kind of logical name."""

  def __init__(self, vocab=64, d=16, f=32, heads=4, hd=4, latent=8, rngs: nnx.Rngs = None):
    self.embed = _param(rngs.params(), (vocab, d), ("vocab", "embed"))
    self.q = _param(rngs.params(), (d, heads, hd), ("embed", "heads", "head_dim"))
    self.squeeze = _param(rngs.params(), (4 * d, d), ("chunk", "embed"))
    self.to_latent = _param(rngs.params(), (d, latent), ("embed", "latent"))
    self.noise = _param(rngs.params(), (latent, d), ("noise", "embed"))
    self.blocks = nnx.List([Block(d, f, rngs) for _ in range(2)])
    self.plain = nnx.Param(jnp.zeros((3,)))  # no logical names: replicated

  def __call__(self, ids_BT):
    x = self.embed[...][ids_BT]
    for b in self.blocks:
      x = b(x)
    return x @ self.embed[...].T


@pytest.mark.parametrize("cfg,shape", [
    (MeshConfig(8, 1, 1), (8, 1, 1)),
    (MeshConfig(2, 4, 1), (2, 4, 1)),
    (MeshConfig(2, 2, 2), (2, 2, 2)),
    (MeshConfig(-1, 1, 1), (8, 1, 1)),
    (MeshConfig(1, -1, 2), (1, 4, 2)),
    (MeshConfig(2, 2, -1), (2, 2, 2)),
])
def test_make_mesh_shapes(cfg, shape):
  mesh = sharding.make_mesh(cfg)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == shape
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert mesh.devices.size == 8


def test_make_mesh_on_subset_of_devices():
  mesh = sharding.make_mesh(MeshConfig(-1, 1, 2), devices=jax.devices()[:4])
  assert tuple(mesh.shape.values()) == (2, 1, 2)


@pytest.mark.parametrize("cfg,msg", [
    (MeshConfig(3, 1, 1), "= 3 but there are 8 devices"),
    (MeshConfig(2, 2, 4), "= 16 but there are 8 devices"),
    (MeshConfig(-1, 3, 1), "not divisible by the fixed axes fsdp=3"),
    ((-1, -1, 1), "only one axis may be -1"),
    ((0, 1, 1), "mesh.data"),
])
def test_bad_mesh_is_a_config_error(cfg, msg):
  with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
    sharding.make_mesh(MeshConfig(*cfg) if isinstance(cfg, tuple) else cfg)


def test_rules_table_covers_every_logical_name():
  names = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "latent", "noise", "chunk",
           "norm", "batch"}
  assert set(sharding.LOGICAL_RULES) == names
  for rule in sharding.LOGICAL_RULES.values():
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    assert set(axes) <= set(sharding.MESH_AXES)


def test_logical_to_spec_rules_and_divisibility():
  mesh = sharding.make_mesh(MeshConfig(2, 2, 2))
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("chunk", "head_dim", "norm")) == P(None, None, None)
  assert sharding.logical_to_spec(None) == P()
  # dims that the mesh axis does not divide are replicated along it
  assert sharding.logical_to_spec(("vocab", "embed"), (63, 16), mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(("embed", "mlp"), (3, 5), mesh) == P(None, None)
  # batch over data x fsdp keeps the axes that divide: 2 rows → only "data"
  assert sharding.logical_to_spec(("batch", None), (2, 7), mesh) == P("data", None)
  assert sharding.logical_to_spec(("batch", None), (8, 7), mesh) == P(("data", "fsdp"), None)
  # a mesh axis is used once per array ("mlp" and "vocab" both map to tensor)
  assert sharding.logical_to_spec(("mlp", "vocab"), (4, 4), mesh) == P("tensor", None)
  with pytest.raises(ValueError, match="unknown logical axis name 'model'"):
    sharding.logical_to_spec(("model",))


def test_batch_sharding_splits_rows():
  mesh = sharding.make_mesh(MeshConfig(2, 4, 1))
  s = sharding.batch_sharding(mesh)
  x = jax.device_put(np.arange(16 * 3).reshape(16, 3), s)
  assert s.spec == P(("data", "fsdp"), None)
  assert {sh.data.shape for sh in x.addressable_shards} == {(2, 3)}


@pytest.fixture(scope="module")
def mesh222():
  return sharding.make_mesh(MeshConfig(2, 2, 2))


@pytest.fixture(scope="module")
def mesh1():
  return sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def toy222(mesh222):
  return sharding.sharded_init(lambda: Toy(rngs=nnx.Rngs(0)), mesh222)


@pytest.fixture(scope="module")
def toy1(mesh1):
  return sharding.sharded_init(lambda: Toy(rngs=nnx.Rngs(0)), mesh1)


def _check_placement(graphdef, state, mesh):
  fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
  emb = state["embed"][...]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert emb.addressable_shards[0].data.shape == (64 // tensor, 16 // fsdp)
  up = state["blocks"][1]["up"][...]
  assert up.sharding.spec == P("fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (16 // fsdp, 32 // tensor)
  assert state["q"][...].sharding.spec == P("fsdp", "tensor", None)
  assert state["squeeze"][...].sharding.spec == P(None, "fsdp")
  assert state["to_latent"][...].sharding.spec == P("fsdp", None)
  assert state["blocks"][0]["norm"][...].sharding.is_fully_replicated
  assert state["plain"][...].sharding.is_fully_replicated
  # the merged model runs on the mesh
  model = nnx.merge(graphdef, state)
  ids = jax.device_put(jnp.arange(16).reshape(8, 2) % 64, sharding.batch_sharding(mesh))
  assert model(ids).shape == (8, 2, 64)


def test_sharded_init_places_params_per_rules(toy222, mesh222):
  _check_placement(*toy222, mesh222)


def test_sharded_init_on_fsdp_tensor_mesh():
  mesh = sharding.make_mesh(MeshConfig(1, 4, 2))
  _check_placement(*sharding.sharded_init(lambda: Toy(rngs=nnx.Rngs(0)), mesh), mesh)


def test_sharded_init_equals_unsharded_init(toy222, toy1):
  sharded, single = toy222[1], toy1[1]
  eager = nnx.state(Toy(rngs=nnx.Rngs(0)))
  for a, b, c in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=0, atol=1e-7)
  assert single["embed"][...].sharding.num_devices == 1
  assert np.abs(np.asarray(sharded["embed"][...])).max() > 0.01  # really initialised


def test_optimizer_state_mirrors_param_shardings(toy222, mesh222):
  graphdef, state = toy222
  mesh = mesh222
  tx = optax.adamw(1e-3)
  # optax state over the nnx.State: mu / nu keep the parameters' Variables and metadata
  opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, state), mesh)
  adam = opt_sh[0]
  assert adam.mu["embed"].get_value().spec == P("tensor", "fsdp")
  assert adam.nu["blocks"][0]["down"].get_value().spec == P("tensor", "fsdp")
  assert adam.count.spec == P()
  # optax state over a pure dict: borrowed by path from `like`
  pure = jax.eval_shape(tx.init, nnx.to_pure_dict(state))
  pure_sh = sharding.state_shardings(pure, mesh, like=state)
  assert pure_sh[0].mu["blocks"][1]["up"].spec == P("fsdp", "tensor")
  assert pure_sh[0].nu["plain"].spec == P()
  # nnx.Optimizer copies the metadata onto its OptVariables
  opt = nnx.Optimizer(nnx.merge(graphdef, state), tx, wrt=nnx.Param)
  o_sh = sharding.state_shardings(nnx.state(opt), mesh)
  assert o_sh["opt_state"][0]["mu"]["squeeze"].get_value().spec == P(None, "fsdp")
  # init_opt_state places a chained, masked optimizer's moments like the parameters
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  opt_state, shardings = sharding.init_opt_state(tx, state, mesh)
  adam = opt_state[1][0]
  assert adam.mu["embed"][...].sharding.spec == P("tensor", "fsdp")
  assert adam.nu["blocks"][1]["up"][...].sharding.spec == P("fsdp", "tensor")
  assert adam.count.sharding == NamedSharding(mesh, P())
  assert jax.tree.map(lambda x: x.sharding, opt_state) == shardings


def test_abstract_state_carries_shardings_without_allocating(mesh222):
  _, abstract = sharding.abstract_state(lambda: Toy(rngs=nnx.Rngs(0)), mesh222)
  emb = abstract["embed"].get_value()
  assert isinstance(emb, jax.ShapeDtypeStruct)
  assert emb.shape == (64, 16) and emb.sharding.spec == P("tensor", "fsdp")


def test_sharded_train_step_matches_single_device(toy222, toy1):
  """A jitted SGD step on the (2,2,2) mesh gives the single-device result."""
  ids = jnp.arange(32).reshape(8, 4) % 64

  def loss_fn(state, graphdef):
    logits = nnx.merge(graphdef, state)(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  def run(graphdef, state):
    state = jax.tree.map(jnp.copy, state)  # the fixtures stay intact under donation
    shard = jax.tree.map(lambda x: x.sharding, state)

    @functools.partial(jax.jit, out_shardings=(shard, None), donate_argnums=0)
    def step(s):
      loss, g = jax.value_and_grad(loss_fn)(s, graphdef)
      return jax.tree.map(lambda p, d: p - 0.5 * d, s, g), loss

    losses = []
    for _ in range(3):
      state, loss = step(state)
      losses.append(float(loss))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(shard)):
      assert a.sharding == b
    return losses

  multi = run(*toy222)
  single = run(*toy1)
  np.testing.assert_allclose(multi, single, rtol=1e-5)
  assert multi[2] < multi[0]


def test_constrain_is_noop_without_mesh_and_shards_with_one():
  x = jnp.ones((8, 4))
  assert sharding.constrain(x, ("batch", None)) is x
  mesh = sharding.make_mesh(MeshConfig(4, 2, 1))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None)))(x)
  assert y.sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  assert {sh.data.shape for sh in y.addressable_shards} == {(1, 4)}
