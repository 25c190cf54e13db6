"""jax.Refs are states: read and written inside smap's transforms, they behave as States do.

Every test runs the same program twice, once with Refs and once with States
(or with plain ``jax.vmap`` and the state passed explicitly), and compares the
outputs and the final values; bad input leaves every Ref and State as it was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import smap
from smap.filter import AtPath, OfType

pytestmark = pytest.mark.skipif(not smap._compat.HAS_REFS, reason="this JAX has no jax.Ref")

B = 8


def _close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


# -- the wall: a State from a Ref, and per-lane Refs ------------------------------------------


def test_param_state_from_a_ref_is_backed_by_it():
    ref = jax.new_ref(jnp.arange(3.0))
    w = smap.ParamState(ref)
    assert isinstance(w, smap.ParamState) and w.ref is ref
    assert repr(w) == "ParamState(ref=float32[3])"
    w.value = w.value * 2
    _close(ref[...], jnp.array([0.0, 2.0, 4.0]))
    ref[...] = jnp.ones(3)  # JAX's own write, outside smap
    _close(w.value, jnp.ones(3))


def test_closed_over_refs_map_per_lane_as_plain_vmap_does():
    """The wall: per-lane Refs (a hidden state per example) and a shared weight, as jax.vmap with state passing."""
    h0 = jax.random.normal(jax.random.key(0), (B, 3))
    w0 = jax.random.normal(jax.random.key(1), (3, 3))
    xs = jax.random.normal(jax.random.key(2), (B, 3))
    hidden, weight = jax.new_ref(h0), jax.new_ref(w0)

    def step(x):
        hidden[...] = jnp.tanh(hidden[...] @ weight[...] + x)
        return hidden[...].sum()

    out = smap.vmap(step, state_in_axes=hidden)(xs)

    def pure(h, x):
        h = jnp.tanh(h @ w0 + x)
        return h.sum(), h

    ref_out, ref_h = jax.vmap(pure)(h0, xs)
    _close(out, ref_out)
    _close(hidden[...], ref_h)
    _close(weight[...], w0)  # read only: shared and untouched


# -- selection: by Ref, by pytree, by type, by path in a Module -------------------------------


class Cell(smap.nn.Module):
    def __init__(self):
        self.w = jax.new_ref(jnp.full((2,), 0.5))
        self.h = jax.new_ref(jnp.zeros((B, 2)))

    def __call__(self, x):
        self.h[...] = self.h[...] * self.w[...] + x
        return self.h[...]


@pytest.mark.parametrize(
    "select",
    [
        lambda cell: cell.h,
        lambda cell: {0: {"hidden": cell.h}},
        lambda cell: AtPath("h"),
        lambda cell: OfType(jax.Ref) & AtPath("h"),
    ],
    ids=["ref", "pytree", "path", "type-and-path"],
)
def test_a_module_holding_refs_selects_them_like_states(select):
    cell = Cell()
    assert list(cell.states()) == ["w", "h"]
    xs = jnp.arange(B * 2.0).reshape(B, 2)
    out = smap.vmap(cell, state_in_axes=select(cell))(xs)
    expected = jax.vmap(lambda h, x: h * 0.5 + x)(jnp.zeros((B, 2)), xs)
    _close(out, expected)
    _close(cell.h[...], expected)


def test_of_type_ref_selects_every_ref_and_no_state():
    ref, state = jax.new_ref(jnp.zeros((B,))), smap.State(jnp.zeros((B,)))

    def f(x):
        ref[...] = ref[...] + x
        state.value = state.value + 2 * x

    smap.vmap(f, state_in_axes=jax.Ref, state_out_axes=smap.State)(jnp.ones(B))
    _close(ref[...], jnp.ones(B))
    _close(state.value, jnp.full((B, B), 2.0))  # shared, written per lane: gains the mapped axis


def test_a_state_from_a_ref_is_selected_by_its_type():
    ref = jax.new_ref(jnp.zeros((B, 2)))
    h = smap.HiddenState(ref)

    def f(x):
        ref[...] = ref[...] + x  # the Ref itself: reads and writes go to h

    smap.vmap(f, state_in_axes=smap.HiddenState)(jnp.ones((B, 2)))
    _close(h.value, jnp.ones((B, 2)))


# -- jit, grad, and the same program with States ---------------------------------------------


def _train(use_refs: bool):
    """A linear model trained by SGD, its parameters in Refs or in States."""
    w0, b0 = jnp.array([[0.5], [-0.25]]), jnp.array([0.1])
    if use_refs:
        w, b = jax.new_ref(w0), jax.new_ref(b0)
        params = smap.ParamState(w), smap.ParamState(b)
        read = lambda: (w[...], b[...])  # noqa: E731

        def write(gw, gb):
            w[...] = w[...] - 0.1 * gw
            b[...] -= 0.1 * gb
    else:
        params = smap.ParamState(w0), smap.ParamState(b0)
        read = lambda: (params[0].value, params[1].value)  # noqa: E731

        def write(gw, gb):
            params[0].value = params[0].value - 0.1 * gw
            params[1].value = params[1].value - 0.1 * gb

    def loss(x, y):
        wv, bv = read()
        return jnp.mean((x @ wv + bv - y) ** 2)

    grads = smap.grad(loss, grad_states=list(params))

    @smap.jit
    def step(x, y):
        gw, gb = grads(x, y)
        write(gw, gb)
        return loss(x, y)

    return step, params


def test_jit_and_grad_on_refs_equal_states():
    x = jax.random.normal(jax.random.key(0), (16, 2))
    y = x @ jnp.array([[1.0], [2.0]])
    step_r, params_r = _train(True)
    step_s, params_s = _train(False)
    for _ in range(3):
        _close(step_r(x, y), step_s(x, y))
    _close([p.value for p in params_r], [p.value for p in params_s])


# -- on devices: the same values as jax.vmap -----------------------------------------------


def _lanes_program(mapping_fn, use_refs: bool):
    counts0 = jnp.zeros((B, 3))
    scale0 = jnp.full((3,), 2.0)
    total0 = jnp.zeros(())
    if use_refs:
        counts, scale, total = jax.new_ref(counts0), jax.new_ref(scale0), jax.new_ref(total0)
        get = lambda r: r[...]  # noqa: E731

        def put(r, v):
            r[...] = v
    else:
        counts, scale, total = smap.ShortTermState(counts0), smap.State(scale0), smap.State(total0)
        get = lambda s: s.value  # noqa: E731

        def put(s, v):
            s.value = v

    def step(x):
        put(counts, get(counts) + x * get(scale))
        put(total, get(total) + jax.lax.pmean(x.sum(), "i"))  # the same in every lane: written once
        return get(counts).sum()

    mapping = smap.StatefulMapping(step, state_in_axes={0: [counts]}, axis_name="i", mapping_fn=mapping_fn)
    return mapping, (counts, scale, total), get


@pytest.mark.parametrize(
    "strategy",
    ["vmap", "shard_map-8", "shard_map-4"],
)
def test_refs_on_devices_equal_states_under_vmap(strategy):
    if strategy == "vmap":
        mapping_fn = jax.vmap
    else:
        n = int(strategy.split("-")[1])
        mapping_fn = sharding.shard_map(sharding.make_mesh(data=n, devices=jax.devices()[:n]), axis="data")
    xs = jnp.arange(B * 3.0).reshape(B, 3)
    mapped_r, refs, get = _lanes_program(mapping_fn, True)
    if strategy.startswith("shard_map"):
        # A Ref's buffer is committed to one device: States made from the Refs place them on the mesh.
        sharding.place([smap.State(r) for r in refs], mapped_r)
    mapped_s, states, get_s = _lanes_program(jax.vmap, False)
    for _ in range(2):
        _close(mapped_r(xs), mapped_s(xs))
    _close([get(r) for r in refs], [get_s(s) for s in states])


def test_nested_jit_around_a_mapping_of_refs():
    ref = jax.new_ref(jnp.zeros((B,)))
    inner = smap.vmap(lambda x: ref.addupdate(x) or x * 2, state_in_axes=ref)
    out = smap.jit(lambda xs: inner(xs).sum())(jnp.arange(B, dtype=jnp.float32))
    _close(out, 2 * jnp.arange(B).sum())
    _close(ref[...], jnp.arange(B))


def test_indexed_reads_and_writes_per_lane():
    ref = jax.new_ref(jnp.zeros((B, 4)))

    def f(x):
        ref[1:3] = ref[1:3] + x
        ref[0] += 1.0
        return ref[3]

    out = smap.vmap(f, state_in_axes=ref)(jnp.ones((B, 2)))
    expected = np.zeros((B, 4))
    expected[:, 1:3] = 1.0
    expected[:, 0] = 1.0
    _close(ref[...], expected)
    _close(out, jnp.zeros(B))


def test_refs_outside_smap_stay_jax_s():
    ref = jax.new_ref(jnp.zeros(2))
    state = smap.State(ref)

    @jax.jit
    def f(x):
        ref[...] = ref[...] + x

    f(jnp.ones(2))
    state.value = jnp.full(2, 5.0)  # an uncommitted value: the Ref stays where it is, and JAX can write it
    smap.jit(lambda x: ref.addupdate(x))(jnp.ones(2))
    f(jnp.ones(2))
    _close(ref[...], jnp.full(2, 7.0))


# -- bad input: clear errors, nothing written --------------------------------------------------


class Net(smap.nn.Module):
    def __init__(self):
        self.w = jax.new_ref(jnp.ones(3))
        self.s = smap.State(jnp.zeros(3))


@pytest.mark.parametrize(
    "body, error, words",
    [
        (lambda net, x: net.w.__setitem__(..., jnp.ones(4)), ValueError, ["Ref 'w'", "shape (4,)"]),
        (lambda net, x: net.w.__setitem__(..., jnp.ones(3, jnp.int32)), TypeError, ["Ref 'w'", "int32"]),
        (lambda net, x: net.w.__setitem__(slice(0, 2), jnp.ones(3)), ValueError, ["Ref 'w'", "shape (3,)"]),
        (lambda net, x: jax.free_ref(net.w), TypeError, ["Ref 'w'", "jax.free_ref"]),
        (lambda net, x: jax.ref.freeze(net.w), TypeError, ["Ref 'w'", "freeze"]),
        (lambda net, x: jax.ref.set(net.w, (), jnp.zeros(3)), TypeError, ["Ref 'w'", "jax.ref.get/set"]),
    ],
    ids=["shape", "dtype", "indexed-shape", "free_ref", "freeze", "ref.set"],
)
@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_bad_writes_name_the_ref_and_change_nothing(body, error, words, transform):
    net = Net()

    def f(x):
        net.s.value = net.s.value + x
        net.w[...] = net.w[...] * 2
        body(net, x)
        return x

    wrapped = smap.jit(f) if transform == "jit" else smap.vmap(f, in_axes=None, axis_size=2)
    with pytest.raises(error) as info:
        wrapped(jnp.ones(3))
    for word in words:
        assert word in str(info.value)
    _close(net.w[...], jnp.ones(3))
    _close(net.s.value, jnp.zeros(3))


def test_a_failing_call_leaves_refs_unchanged():
    ref, state = jax.new_ref(jnp.zeros(2)), smap.State(jnp.zeros(2))

    def f(x):
        ref[...] = ref[...] + x
        state.value = state.value + x
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        smap.jit(f)(jnp.ones(2))
    _close(ref[...], jnp.zeros(2))
    _close(state.value, jnp.zeros(2))


def test_a_shared_ref_written_per_lane_is_refused_whatever_the_policy():
    net = Net()

    def f(x):
        net.w[...] = net.w[...] + x

    for policy in ("ignore", "warn", "raise"):
        with pytest.raises(smap.BatchAxisError, match="Ref 'w'.*cannot gain the mapped axis"):
            smap.vmap(f, unexpected_out_state_mapping=policy)(jnp.ones((B, 3)))
    _close(net.w[...], jnp.ones(3))


def test_a_ref_backs_one_state_and_cannot_be_reset():
    ref = jax.new_ref(jnp.zeros(2))
    w = smap.ParamState(ref)
    with pytest.raises(ValueError, match="already backs ParamState"):
        smap.State(ref)
    with pytest.raises(TypeError, match="shape and dtype are fixed"):
        w.reset(jnp.zeros(3))
    _close(w.value, jnp.zeros(2))


# -- Refs passed as arguments: states, as JAX's own transformations take them ---------------


def _train_with_ref_arguments():
    """_train(True)'s model, its parameters passed to the step as a dict of Refs."""
    params = {"w": jax.new_ref(jnp.array([[0.5], [-0.25]])), "b": jax.new_ref(jnp.array([0.1]))}

    def loss(params, x, y):
        return jnp.mean((x @ params["w"][...] + params["b"][...] - y) ** 2)

    @smap.jit
    def step(params, x, y):
        gw, gb = smap.grad(loss, grad_states=[params["w"], params["b"]], argnums=None)(params, x, y)
        params["w"][...] = params["w"][...] - 0.1 * gw
        params["b"][...] -= 0.1 * gb
        return loss(params, x, y)

    return step, params


def test_ref_arguments_under_jit_and_grad_equal_states():
    x = jax.random.normal(jax.random.key(0), (16, 2))
    y = x @ jnp.array([[1.0], [2.0]])
    step_r, params_r = _train_with_ref_arguments()
    step_s, params_s = _train(False)
    for _ in range(3):
        _close(step_r(params_r, x, y), step_s(x, y))
    _close([params_r["w"][...], params_r["b"][...]], [p.value for p in params_s])


def test_each_ref_passed_is_its_own_state():
    """The same function called with two Refs writes each; the cache tells them apart."""

    @smap.jit
    def add(ref, x):
        ref[...] = ref[...] + x
        return ref[...].sum()

    a, b = jax.new_ref(jnp.zeros(2)), jax.new_ref(jnp.ones(2))
    _close(add(a, 1.0), 2.0)
    _close(add(b, 1.0), 4.0)
    _close(add(a, 1.0), 4.0)
    _close([a[...], b[...]], [jnp.full(2, 2.0), jnp.full(2, 2.0)])


def test_a_ref_passed_after_arrays_is_a_state():
    """The call written out for the first calls' array arguments still finds a Ref among its arguments."""

    @smap.jit
    def add(target, x):
        if isinstance(target, jax.Ref):
            target[...] = target[...] + x
            return target[...].sum()
        return (target + x).sum()

    _close(add(jnp.zeros(2), 1.0), 2.0)
    _close(add(np.zeros(2), 2.0), 4.0)
    ref = jax.new_ref(jnp.zeros(2))
    _close(add(ref, 1.0), 2.0)
    _close(add(ref, 1.0), 4.0)
    _close(ref[...], jnp.full(2, 2.0))
    _close(add(jnp.ones(2), 1.0), 4.0)


def _step(refs, x):
    """Per-lane code on a dict of Refs: 'h' a hidden state, 'w' a weight, 'n' a count written once."""
    refs["h"][...] = jnp.tanh(refs["h"][...] * refs["w"][...] + x)
    refs["n"][...] = refs["n"][...] + jax.lax.psum(1.0, "i")
    return refs["h"][...].sum()


def _pure(h, w, n, xs):
    """_step with the state passed explicitly, under plain jax.vmap: the reference."""
    out, h = jax.vmap(lambda h, x: (jnp.tanh(h * w + x).sum(), jnp.tanh(h * w + x)))(h, xs)
    return out, h, n + xs.shape[0]


def _initial(lanes):
    k = jax.random.split(jax.random.key(3), 3)
    return (
        jax.random.normal(k[0], (lanes, 3)),
        jax.random.normal(k[1], (3,)),
        jnp.zeros(()),
        jax.random.normal(k[2], (lanes, 3)),
    )


@pytest.mark.parametrize("select", ["in_axes", "the-ref", "type"])
def test_ref_arguments_to_vmap_equal_explicit_state_passing(select):
    """A Ref argument is per-lane by its in_axes entry (as jax.vmap reads it), by itself or by its State's type."""
    h0, w0, n0, xs = _initial(B)
    refs = {"h": jax.new_ref(h0), "w": jax.new_ref(w0), "n": jax.new_ref(n0)}
    if select == "in_axes":
        kwargs = {"in_axes": ({"h": 0, "w": None, "n": None}, 0)}
    elif select == "the-ref":
        kwargs = {"in_axes": (None, 0), "state_in_axes": refs["h"]}
    else:
        hidden = smap.HiddenState(refs["h"])  # noqa: F841  (the Ref's State while it lives)
        kwargs = {"in_axes": (None, 0), "state_in_axes": smap.HiddenState}
    mapped = smap.vmap(_step, axis_name="i", **kwargs)
    h, n = h0, n0
    for _ in range(2):
        out, h, n = _pure(h, w0, n, xs)
        _close(mapped(refs, xs), out)
    _close([refs["h"][...], refs["w"][...], refs["n"][...]], [h, w0, n])


def test_ref_arguments_to_smap_vmap_equal_jax_vmap_on_refs():
    """JAX's own jax.vmap takes the same Ref arguments with the same in_axes: the same values.

    (Without the count: jax.vmap refuses to write a psum into an unbatched Ref, which smap allows.)
    """
    h0, w0, _, xs = _initial(B)

    def step(refs, x):
        refs["h"][...] = jnp.tanh(refs["h"][...] * refs["w"][...] + x)
        return refs["h"][...].sum()

    ours = {"h": jax.new_ref(h0), "w": jax.new_ref(w0)}
    theirs = {"h": jax.new_ref(h0), "w": jax.new_ref(w0)}
    in_axes = ({"h": 0, "w": None}, 0)
    for _ in range(2):
        _close(smap.vmap(step, in_axes=in_axes)(ours, xs), jax.vmap(step, in_axes)(theirs, xs))
    _close([ours[k][...] for k in "hw"], [theirs[k][...] for k in "hw"])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_a_ref_argument_along_another_axis(axis):
    xs = jnp.arange(B * 3.0).reshape(B, 3)
    ref = jax.new_ref(jnp.zeros((3, B)) if axis else jnp.zeros((B, 3)))

    def add(r, x):
        r[...] = r[...] + x
        return r[...].sum()

    out = smap.vmap(add, in_axes=(axis, 0))(ref, xs)
    _close(out, xs.sum(1))
    _close(ref[...], xs.T if axis else xs)


@pytest.mark.parametrize("per_device", [1, 2, 4])
def test_ref_arguments_on_eight_devices_equal_states_and_jax_vmap(per_device):
    """sharding.shard_map over 8 devices, 1, 2 or 4 lanes each: Ref arguments, States, and jax.vmap agree."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = sharding.make_mesh(data=8)
    lanes = 8 * per_device
    h0, w0, n0, xs = _initial(lanes)
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    refs = {"h": jax.new_ref(jax.device_put(h0, split)), "w": jax.new_ref(jax.device_put(w0, whole))}
    refs["n"] = jax.new_ref(jax.device_put(n0, whole))
    mapping_fn = sharding.shard_map(mesh, axis="data")
    with_refs = smap.StatefulMapping(
        _step, in_axes=({"h": 0, "w": None, "n": None}, 0), axis_name="i", mapping_fn=mapping_fn
    )
    states = {"h": smap.HiddenState(h0), "w": smap.ParamState(w0), "n": smap.State(n0)}
    views = {k: _StateView(s) for k, s in states.items()}
    with_states = smap.StatefulMapping(
        lambda x: _step(views, x), state_in_axes=smap.HiddenState, axis_name="i", mapping_fn=mapping_fn
    )
    sharding.place(list(states.values()), with_states)
    xs = jax.device_put(xs, split)
    h, n = h0, n0
    for _ in range(2):
        out, h, n = _pure(h, w0, n, xs)
        _close(with_refs(refs, xs), out)
        _close(with_states(xs), out)
    _close([refs[k][...] for k in "hwn"], [h, w0, n])
    _close([states[k].value for k in "hwn"], [h, w0, n])


@pytest.mark.parametrize("select", ["in_axes", "a filter that reads the value"])
def test_ref_arguments_follow_mappings_on_other_devices(select):
    """Refs made on one device, then mapped on 4 devices, on 8, on 2 and by jax.vmap: each call moves
    them to its devices and gives plain jax.vmap's values (a state left elsewhere moves to the call's
    devices: the retry that asks the compiler where they go must not write an abstract value into a Ref)."""
    h0, w0, n0, xs = _initial(B)
    refs = {"h": jax.new_ref(h0), "w": jax.new_ref(w0), "n": jax.new_ref(n0)}
    if select == "in_axes":
        axes = dict(in_axes=({"h": 0, "w": None, "n": None}, 0))
    else:
        axes = dict(in_axes=(None, 0), state_in_axes={0: lambda path, state: state.value.shape == (B, 3)})
    h, n = h0, n0
    for n_devices in (4, 8, 2, None):
        if n_devices is None:
            mapping_fn = jax.vmap
        else:
            mesh = sharding.make_mesh(data=n_devices, devices=jax.devices()[:n_devices])
            mapping_fn = sharding.shard_map(mesh, axis="data")
        out, h, n = _pure(h, w0, n, xs)
        _close(smap.StatefulMapping(_step, axis_name="i", mapping_fn=mapping_fn, **axes)(refs, xs), out)
        _close([refs[k][...] for k in "hwn"], [h, w0, n])


def test_a_ref_state_in_place_stays_when_another_state_moves_to_the_calls_devices():
    """The default key left on 2 devices by a mapping there, then a jax.vmap reading a Ref on one device:
    the key moves (retry path 3), and the Ref, already in place, is not written with its own buffer
    (which JAX refuses: 'Unable to replace an Array with itself'). Found by the state fuzzer."""
    w = smap.ParamState(jax.new_ref(jnp.arange(4.0)))
    key = smap.random.DEFAULT.value
    smap.random.DEFAULT.value = jax.device_put(
        key,
        jax.sharding.NamedSharding(sharding.make_mesh(data=2, devices=jax.devices()[:2]), jax.sharding.PartitionSpec()),
    )
    xs = jnp.ones((B, 4))
    out = smap.vmap(lambda x: x * w.value + smap.random.normal(size=4))(xs)
    keys = jax.random.split(key, B)
    _close(out, xs * jnp.arange(4.0) + jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], (4,)))(keys))
    _close(w.value, jnp.arange(4.0))


def test_a_ref_state_written_on_one_explicit_mesh_is_mapped_on_another():
    """A ParamState backed by a Ref, written by a mapping on a mesh of 2 devices (Explicit axes), then
    read and written by one on 4: a trace reading the state must not make the Ref's buffer, typed
    with the first mesh, a constant of the second's program (shard_map refuses to close over it)."""
    w = smap.ParamState(jax.new_ref(jnp.arange(3.0)))

    def step(x):
        w.value = w.value - 0.1 * jax.lax.pmean(x, "i")
        return x * w.value

    want = jnp.arange(3.0)
    for n in (2, 4):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:n])
        xs = jnp.arange(B * 3.0).reshape(B, 3) / n
        got = smap.StatefulMapping(step, axis_name="i", mapping_fn=sharding.shard_map(mesh, axis="data"))(xs)
        want = want - 0.1 * xs.mean(0)
        _close(got, xs * want)
        _close(w.value, want)


class _StateView:
    """A State read and written as a Ref is (``view[...]``): the same per-lane code on States."""

    def __init__(self, state):
        self.state = state

    def __getitem__(self, idx):
        return self.state.value[idx]

    def __setitem__(self, idx, value):
        self.state.value = self.state.value.at[idx].set(value) if idx is not Ellipsis else value


def test_a_ref_argument_inside_a_jitted_mapping():
    """smap.jit around smap.vmap, the Ref passed through both as an argument."""
    ref = jax.new_ref(jnp.zeros((B,)))
    inner = smap.vmap(lambda r, x: r.addupdate(x) or x * 2)
    out = smap.jit(lambda r, xs: inner(r, xs).sum())(ref, jnp.arange(B, dtype=jnp.float32))
    _close(out, 2 * jnp.arange(B).sum())
    _close(ref[...], jnp.arange(B))


def test_lowering_with_ref_arguments_writes_nothing():
    ref = jax.new_ref(jnp.ones((B, 2)))

    def step(r, x):
        r[...] = r[...] * x
        return r[...].sum()

    mapped = smap.vmap(step)
    compiled = mapped.lower(ref, jnp.full((B, 2), 3.0)).compile()
    assert compiled.memory_analysis().argument_size_in_bytes == 2 * B * 2 * 4  # the Ref's value and x
    assert smap.jit(step).trace(ref, 2.0).jaxpr.in_avals[0].shape == (B, 2)  # the Ref's State is the first input
    _close(ref[...], jnp.ones((B, 2)))


# -- Ref arguments: bad input names the argument, and nothing changes ------------------------


@pytest.mark.parametrize(
    "body, error, words",
    [
        (lambda r: r["w"].__setitem__(..., jnp.ones(4)), ValueError, ["Ref args[0]['w']", "shape (4,)", "fixed"]),
        (lambda r: r["w"].__setitem__(..., jnp.ones(3, jnp.int32)), TypeError, ["Ref args[0]['w']", "int32"]),
        (lambda r: jax.free_ref(r["w"]), TypeError, ["Ref args[0]['w']", "jax.free_ref"]),
        (lambda r: jax.ref.freeze(r["w"]), TypeError, ["Ref args[0]['w']", "freeze"]),
    ],
    ids=["shape", "dtype", "free_ref", "freeze"],
)
@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_bad_writes_of_a_ref_argument_name_it_and_change_nothing(body, error, words, transform):
    refs = {"w": jax.new_ref(jnp.ones(3)), "s": jax.new_ref(jnp.zeros(3))}
    other = smap.State(jnp.zeros(3))

    def f(r, x):
        other.value = other.value + x
        r["s"][...] = r["s"][...] + 1.0
        body(r)
        return x

    wrapped = smap.jit(f) if transform == "jit" else smap.vmap(f, in_axes=(None, None), axis_size=2)
    with pytest.raises(error) as info:
        wrapped(refs, jnp.ones(3))
    for word in words:
        assert word in str(info.value)
    _close([refs["w"][...], refs["s"][...], other.value], [jnp.ones(3), jnp.zeros(3), jnp.zeros(3)])


def test_lower_with_the_wrong_structure_names_the_argument_and_changes_nothing():
    ref = jax.new_ref(jnp.zeros((B, 2)))

    def f(r, x):
        r[...] = r[...] + x

    mapped = smap.vmap(f, in_axes=({"a": 0}, 0))
    with pytest.raises(ValueError, match=r"in_axes\[0\], for args\[0\]"):
        mapped.lower(ref, jnp.ones((B, 2)))
    with pytest.raises(ValueError, match=r"mapped sizes differ: .*Ref args\[0\]"):
        smap.vmap(f).lower(ref, jnp.ones((B + 1, 2)))
    with pytest.raises(ValueError, match="in_axes has 2 entries but the function was called with 1"):
        smap.vmap(f, in_axes=(0, 0)).lower(ref)
    _close(ref[...], jnp.zeros((B, 2)))


def test_a_ref_argument_given_two_axes_is_refused():
    ref = jax.new_ref(jnp.zeros((B, B)))

    def f(r, q, x):
        r[...] = r[...] + x

    with pytest.raises(ValueError, match=r"in_axes maps args\[0\], a jax.Ref, along axis 0, but state_in_axes"):
        smap.vmap(f, in_axes=(0, 0, 0), state_in_axes={1: jax.Ref})(ref, ref, jnp.ones((B, B)))
    with pytest.raises(ValueError, match=r"the same jax.Ref is passed as args\[0\] with in_axes 0 and as args\[1\]"):
        smap.vmap(f, in_axes=(0, 1, 0))(ref, ref, jnp.ones((B, B)))
    _close(ref[...], jnp.zeros((B, B)))


def test_differentiating_a_ref_argument_says_to_use_grad_states():
    ref = jax.new_ref(jnp.ones(3))
    loss = lambda r, x: jnp.sum(r[...] * x) ** 2  # noqa: E731
    with pytest.raises(TypeError, match=r"argnums selects args\[0\], which holds a jax.Ref.*grad_states"):
        smap.grad(loss)(ref, jnp.ones(3))
    # the fix: the Ref as a state (itself, or a State made from it) in grad_states
    _close(smap.grad(loss, grad_states=ref, argnums=None)(ref, jnp.arange(3.0)), 6 * jnp.arange(3.0))


def test_a_ref_freed_or_frozen_before_the_call_behaves_as_under_jax_jit():
    """JAX 0.10-0.12 leave a Ref freed or frozen outside a trace readable and writable: smap as jax.jit."""

    def f(r, x):
        r[...] = r[...] + x
        return r[...]

    for end in (jax.free_ref, jax.ref.freeze):
        ours, theirs = jax.new_ref(jnp.zeros(2)), jax.new_ref(jnp.zeros(2))
        end(ours)
        end(theirs)
        _close(smap.jit(f)(ours, 1.0), jax.jit(f)(theirs, 1.0))
        _close(ours[...], theirs[...])


def test_a_ref_passed_by_keyword_is_mapped_along_axis_0_as_jax_vmap_maps_keywords():
    def add(x, *, acc):
        acc[...] = acc[...] + x
        return acc[...].sum()

    xs = jnp.arange(B * 2.0).reshape(B, 2)
    ours, theirs = jax.new_ref(jnp.ones((B, 2))), jax.new_ref(jnp.ones((B, 2)))
    _close(smap.vmap(add)(xs, acc=ours), jax.vmap(add)(xs, acc=theirs))
    _close(ours[...], theirs[...])
    _close(smap.jit(add)(xs, acc=ours), (2 * xs + 1).sum())
    _close(ours[...], 2 * xs + 1)


@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_refs_passed_once_and_freed_are_forgotten(transform):
    """A new Ref each call: each call is right, and the transform keeps no State of the freed ones."""
    import gc

    def add(r, x):
        r[...] = r[...] + x
        return r[...].sum()

    wrapped = smap.jit(add) if transform == "jit" else smap.vmap(add, in_axes=(0, None))
    for i in range(4):
        ref = jax.new_ref(jnp.full((2, 3), float(i)))
        _close(wrapped(ref, 1.0), (i + 1.0) * (6 if transform == "jit" else 3))
        _close(ref[...], jnp.full((2, 3), i + 1.0))
        del ref
        gc.collect()
    assert len(wrapped._state_list.states) <= 1
    assert sum(map(len, wrapped._entries.values())) <= 1


def test_a_ref_returned_is_refused_naming_the_output_as_jax_jit_refuses_it():
    ref = jax.new_ref(jnp.ones(2))
    with pytest.raises(TypeError, match=r"returned a Ref as output\[1\]: .* Return its value, ref\[\.\.\.\], instead"):
        smap.jit(lambda x: (x, ref))(jnp.ones(2))
    with pytest.raises(ValueError, match="cannot be returned"):  # (plain JAX)
        jax.jit(lambda x: (x, ref))(jnp.ones(2))
    np.testing.assert_array_equal(ref[...], jnp.ones(2))
