"""Bad input to smap's transforms: an error naming the argument and what was
expected, raised where the mistake is made, and every State unchanged."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


def values(*states):
    return [np.asarray(s.value) for s in states]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: smap.jit(42), r"smap\.jit: fun must be callable, got int 42"),
        (lambda: smap.grad(42), r"smap\.grad: fun must be callable, got int 42"),
        (lambda: smap.vmap(42), r"smap\.vmap: fn must be callable, got int 42"),
        (lambda: smap.StatefulMapping(42), r"fun must be callable, got int 42"),
        (lambda: smap.StatefulMapping(lambda x: x, mapping_fn=42), r"mapping_fn must be callable, got int 42"),
    ],
)
def test_non_callables_are_rejected_at_construction(make, words):
    with pytest.raises(TypeError, match="Expected a callable"):
        jax.jit(42)  # as JAX does
    with pytest.raises(TypeError, match=words):
        make()


@pytest.mark.parametrize("argnums", ["x", 1.5, (0, "y")])
def test_grad_argnums_must_be_ints(argnums):
    words = r"smap\.grad: argnums must be an int, a sequence of ints or None, got " + re.escape(repr(argnums))
    with pytest.raises(TypeError, match=words):
        smap.grad(lambda x, y: x.sum(), argnums=argnums)


def test_grad_with_aux_that_is_not_arrays_names_the_leaf(close):
    w = smap.ParamState(jnp.ones(2))
    calls = smap.LongTermState(jnp.zeros(()))

    def loss(x):
        calls.value = calls.value + 1
        return (w.value * x).sum(), {"x": x, "label": "hello"}

    before = values(w, calls)
    with pytest.raises(TypeError, match=r"has_aux=True, aux must be a pytree of arrays, but aux\['label'\] is a str"):
        smap.grad(loss, grad_states=w, has_aux=True)(jnp.ones(2))
    for state, old in zip((w, calls), before):
        np.testing.assert_array_equal(np.asarray(state.value), old)
    # Arrays and Python numbers are fine as aux, as in jax.grad.
    fine = lambda x: ((w.value * x).sum(), {"x": x, "n": 3})  # noqa: E731
    grads, aux = smap.grad(fine, grad_states=w, has_aux=True)(jnp.ones(2))
    ref_grads, ref_aux = jax.grad(lambda v, x: ((v * x).sum(), {"x": x, "n": 3}), has_aux=True)(w.value, jnp.ones(2))
    close((grads, aux), (ref_grads, ref_aux))


def _counting_step():
    w = smap.ParamState(jnp.ones(2))
    calls = smap.LongTermState(jnp.zeros(()))

    def step(n, x, extra=None):
        calls.value = calls.value + 1
        w.value = w.value + jnp.sum(x) * n
        return x * w.value

    return step, (w, calls)


@pytest.mark.parametrize(
    "make, call, where",
    [
        (lambda f: smap.jit(f), lambda f: f(2.0, "abc"), r"args\[1\]"),
        (lambda f: smap.jit(f, static_argnums=0), lambda f: f(2, jnp.ones(2), {"a": "b"}), r"args\[2\]\['a'\]"),
        (
            lambda f: smap.vmap(f, in_axes=(None, 0)),
            lambda f: f(2.0, jnp.ones((4, 2)), extra=[1.0, object()]),
            r"kwargs\['extra'\]\[1\]",
        ),
        (lambda f: smap.grad(lambda n, x: f(n, x).sum(), argnums=1), lambda f: f(2.0, "abc"), r"args\[1\]"),
        (lambda f: smap.jit(f), lambda f: f.lower(2.0, "abc"), r"args\[1\]"),
        (lambda f: smap.jit(f), lambda f: f(2.0, np.array([1.0, None])), r"args\[1\]"),
        (lambda f: smap.vmap(f, in_axes=(None, 0)), lambda f: f(2.0, np.array(["a", "b"])), r"args\[1\]"),
    ],
    ids=["jit", "jit, after a static argument", "vmap, a keyword", "grad", "lower", "object array", "str array"],
)
def test_an_argument_that_is_not_an_array_is_named(make, call, where):
    """JAX's own error would count the states' values among the arguments; smap names the user's."""
    step, states = _counting_step()
    f = make(step)
    before = values(*states)
    with pytest.raises(
        TypeError,
        match=where
        + r": expected an array or a Python scalar, got ('(str|object)'|a NumPy array of dtype (object|<U1)); "
        r"mark non-array",
    ):
        call(f)
    for state, old in zip(states, before):
        np.testing.assert_array_equal(np.asarray(state.value), old)


@pytest.mark.parametrize(
    "make, call, where",
    [
        (
            lambda f: smap.jit(f, static_argnames="extra"),
            lambda f: f(2.0, jnp.ones(2), extra=[1]),
            r"kwargs\['extra'\]",
        ),
        (lambda f: smap.jit(f, static_argnums=0), lambda f: f({"n": 2}, jnp.ones(2)), r"args\[0\]"),
        (
            lambda f: smap.StatefulMapping(f, static_argnums=2),
            lambda f: f(2.0, jnp.ones((4, 2)), (1, [2])),
            r"args\[2\]",
        ),
    ],
    ids=["jit, by name", "jit, by position", "mapping, a tuple holding a list"],
)
def test_a_static_argument_that_is_not_hashable_is_named(make, call, where):
    """jax.jit's message names only the value; smap names the argument, on the first call and once the call is
    written out, and no state changes."""
    step, states = _counting_step()
    f = make(step)
    before = values(*states)
    for _ in range(2):
        with pytest.raises(ValueError, match=where + r" is a (list|dict|tuple), .* which is not hashable; a static"):
            call(f)
        for state, old in zip(states, before):
            np.testing.assert_array_equal(np.asarray(state.value), old)


def test_an_argument_that_is_not_an_array_is_named_on_the_cached_path(close):
    step, (w, calls) = _counting_step()
    f = smap.jit(step)
    f(2.0, jnp.ones(2))
    f(2.0, jnp.ones(2))  # the call written out for two arguments
    before = values(w, calls)
    with pytest.raises(TypeError, match=r"args\[1\]: expected an array or a Python scalar, got 'str'"):
        f(2.0, "abc")
    for state, old in zip((w, calls), before):
        np.testing.assert_array_equal(np.asarray(state.value), old)
    close(f(2.0, jnp.ones(2)), jnp.ones(2) * (before[0] + 4.0))  # and the next call runs as before


@pytest.mark.parametrize("key", ["nope", ("a", "b"), None])
def test_get_jaxpr_by_cache_with_something_that_is_not_a_key(key):
    f = smap.jit(lambda x: x + 1)
    f(jnp.ones(2))
    with pytest.raises(TypeError, match=r"get_jaxpr_by_cache takes a key from get_arg_cache_key"):
        f.get_jaxpr_by_cache(key)
    assert f.get_jaxpr_by_cache(f.get_arg_cache_key(jnp.ones(2))) is not None


# -- a string where a filter is expected -----------------------------------------


class Cell(smap.nn.Module):
    def __init__(self):
        self.h = smap.HiddenState(jnp.zeros((4, 2)))
        self.w = smap.ParamState(jnp.full((2,), 0.5), tag="misuse-frozen")

    def __call__(self, x):
        self.h.value = jnp.tanh(self.h.value + x * self.w.value)
        return self.h.value.sum()


def cell_reference(h, w, xs):
    """Cell mapped by plain jax.vmap with h split along axis 0 and w shared."""
    new_h = jax.vmap(lambda h_i, x: jnp.tanh(h_i + x * w))(h, xs)
    return new_h.sum(axis=1), new_h


@pytest.mark.parametrize(
    "spec, where",
    [
        ({"state_in_axes": {0: "hidden"}}, r"state_in_axes\[0\]"),
        ({"state_in_axes": "hidden"}, "state_in_axes"),
        ({"state_in_axes": smap.HiddenState, "state_out_axes": "hidden"}, "state_out_axes"),
        ({"state_in_axes": {0: smap.HiddenState, None: "hidden"}}, r"state_in_axes\[None\]"),
    ],
)
def test_a_string_that_is_no_tag_names_what_it_could_have_meant(spec, where, close):
    cell = Cell()
    before = values(cell.h, cell.w)
    xs = jnp.arange(8.0).reshape(4, 2)
    with pytest.raises(ValueError) as error:
        smap.vmap(cell, **spec)(xs)
    message = str(error.value)
    assert re.match(
        rf"Cell: {where} is the string 'hidden', which selects the States tagged 'hidden', and no State", message
    )
    assert "To select the states of type HiddenState, pass the class smap.HiddenState." in message
    assert re.search(r"Tags in use: .*'misuse-frozen'", message)
    assert "Paths of the states here: 'h', 'w'." in message
    for state, old in zip((cell.h, cell.w), before):
        np.testing.assert_array_equal(state.value, old)
    # What it meant: the type.
    out = smap.vmap(cell, state_in_axes=smap.HiddenState)(xs)
    close((out, cell.h.value), cell_reference(jnp.asarray(before[0]), jnp.asarray(before[1]), xs))


def test_a_path_given_as_a_string_points_to_at_path(close):
    cell = Cell()
    before = values(cell.h, cell.w)
    xs = jnp.ones((4, 2))
    with pytest.raises(ValueError, match=r"To select the states at path 'h', pass smap\.filter\.AtPath\('h'\)"):
        smap.vmap(cell, state_in_axes={0: "h"})(xs)
    np.testing.assert_array_equal(cell.h.value, before[0])
    out = smap.vmap(cell, state_in_axes={0: smap.filter.AtPath("h")})(xs)
    close((out, cell.h.value), cell_reference(jnp.asarray(before[0]), jnp.asarray(before[1]), xs))


def test_selectors_that_may_select_nothing_here_stay_silent(close):
    # A known tag that this function does not touch, and a generic type selector with no such
    # state here, select nothing without an error or a warning: the state is shared.
    smap.State(jnp.zeros(()), tag="misuse-elsewhere")
    total = smap.LongTermState(jnp.ones(2))
    xs = jnp.arange(3.0)
    for spec in ("misuse-elsewhere", smap.filter.OfType(smap.ShortTermState), smap.filter.AtPath("nowhere")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = smap.vmap(lambda x: x * total.value.sum(), state_in_axes=spec)(xs)
        close(out, xs * 2.0)


def test_a_tag_given_after_the_mapping_is_built_is_known_at_the_call(close):
    mapped = smap.vmap(lambda x: buffer.value + x, state_in_axes="misuse-late")  # noqa: F821 - defined below
    buffer = smap.State(jnp.array([10.0, 20.0, 30.0]), tag="misuse-late")
    close(mapped(jnp.ones(3)), jnp.array([11.0, 21.0, 31.0]))  # split along axis 0 by its tag


def test_module_states_with_a_string_that_is_no_tag():
    cell = Cell()
    with pytest.raises(
        ValueError, match=r"(?s)Cell\.states\(filter\) is the string 'hidden'.*pass the class smap\.HiddenState"
    ):
        cell.states("hidden")
    assert cell.states("misuse-frozen") == {"w": cell.w}


# -- a write that smap refuses leaves the old value -----------------------------------


def _in_raw_jit_setattr(s):
    jax.jit(lambda x: setattr(s, "value", x))(jnp.ones(s.value.shape))


def _in_raw_jit_reset(s):
    jax.jit(lambda x: s.reset(x))(jnp.ones(3))


def _raw_jit_around_smap_jit(s):
    jax.jit(smap.jit(lambda x: setattr(s, "value", s.value + x)))(jnp.ones(s.value.shape))


def _raw_jit_around_smap_vmap(s):
    jax.jit(smap.vmap(lambda x: setattr(s, "value", s.value + x.sum()), in_axes=None, axis_size=2))(jnp.ones(2))


def _raw_grad_around_smap_jit(s):
    step = smap.jit(lambda x: (setattr(s, "value", s.value + x), (x * x).sum())[1])
    jax.grad(step)(jnp.ones(s.value.shape))


def _raw_vmap_setattr(s):
    jax.vmap(lambda x: setattr(s, "value", x))(jnp.ones((3, *s.value.shape)))


def _raw_vmap_around_smap_jit(s):
    step = smap.jit(lambda x: setattr(s, "value", s.value + x))
    jax.vmap(step)(jnp.ones((2, *s.value.shape)))


def _smap_jit_closing_over_a_raw_tracer(s):
    jax.jit(lambda x: smap.jit(lambda: setattr(s, "value", x))())(jnp.ones(s.value.shape))


def _scan_around_smap_jit(s):
    step = smap.jit(lambda x: setattr(s, "value", s.value + x))
    jax.lax.scan(lambda c, x: (step(x), None), None, jnp.ones((2, *s.value.shape)))


_UNDER_VMAP = r"\(jax\.vmap\)[.;].*To carry states through, map the function with smap\.vmap"
_UNDER_JIT = r"\(jax\.jit, jax\.checkpoint, or the body of a jax\.lax\.scan.*put smap\.jit around it"


@pytest.mark.parametrize(
    "write, named",  # the JAX transformation the error names, and the smap transform it proposes
    [
        (_in_raw_jit_setattr, _UNDER_JIT),
        (_in_raw_jit_reset, _UNDER_JIT),
        (_raw_jit_around_smap_jit, _UNDER_JIT),
        (_raw_jit_around_smap_vmap, _UNDER_JIT),
        (
            _raw_grad_around_smap_jit,
            r"\(jax\.grad, jax\.jvp or jax\.vjp\)\. To carry states through, differentiate with smap\.grad",
        ),
        (_raw_vmap_setattr, _UNDER_VMAP),
        (_raw_vmap_around_smap_jit, _UNDER_VMAP),
        (_smap_jit_closing_over_a_raw_tracer, _UNDER_JIT),
        (_scan_around_smap_jit, _UNDER_JIT),
    ],
)
def test_a_refused_traced_write_leaves_the_old_value_and_it_reads_back(write, named, close):
    class Holder(smap.nn.Module):
        def __init__(self):
            self.acc = smap.LongTermState(jnp.array([1.0, 2.0, 3.0]))

    holder = Holder()
    s = holder.acc
    with pytest.raises(TypeError, match=r"state 'acc' \(LongTermState\) .*smap does not see " + named):
        write(s)
    # The state holds its old value, concrete; reading it, plainly or in a transform, gives that value.
    assert type(s.value) is type(jnp.zeros(1)) and not isinstance(s.value, jax.core.Tracer)
    np.testing.assert_array_equal(s.value, [1.0, 2.0, 3.0])
    close(smap.jit(lambda: s.value * 2)(), jnp.array([2.0, 4.0, 6.0]))
    # ... and a write that smap sees starts from it.
    smap.jit(lambda x: setattr(s, "value", s.value + x))(jnp.ones(3))
    np.testing.assert_array_equal(s.value, [2.0, 3.0, 4.0])
