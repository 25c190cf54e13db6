"""smap.jit: state writes against jax.jit with explicit state passing, caching,
static arguments, failure atomicity, nesting, the cache-key API."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


def as_np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# -- results against a pure reference ------------------------------------------


class Model(smap.nn.Module):
    def __init__(self):
        self.w = smap.ParamState(jnp.array([[1.0, -2.0], [0.5, 3.0]]))
        self.acc = smap.LongTermState(jnp.zeros(2))
        self.count = smap.ShortTermState(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        y = jnp.tanh(x @ self.w.value)
        self.acc.value = self.acc.value + y
        self.count.value = self.count.value + 1
        return y.sum()


@jax.jit
def pure_step(x, w, acc, count):
    y = jnp.tanh(x @ w)
    return y.sum(), (w, acc + y, count + 1)


def test_state_writes_match_pure_reference(close):
    model = Model()
    step = smap.jit(model)
    w, acc, count = model.w.value, model.acc.value, model.count.value
    for x in [jnp.array([1.0, 0.0]), jnp.array([0.3, -0.2]), jnp.array([2.0, 1.0])]:
        out = step(x)
        expected, (w, acc, count) = pure_step(x, w, acc, count)
        close(out, expected)
        close(model.w.value, w)
        close(model.acc.value, acc)
        assert int(model.count.value) == int(count)
    assert int(model.count.value) == 3


def test_decorator_with_closure_states(close):
    total = smap.State(jnp.zeros(()))
    history = smap.State(jnp.zeros(3))

    @smap.jit
    def add(x):
        total.value = total.value + x.sum()
        history.value = jnp.roll(history.value, 1).at[0].set(total.value)
        return total.value * 2

    close(add(jnp.arange(3.0)), 6.0)
    close(add(jnp.ones(3)), 12.0)
    close(total.value, 6.0)
    close(history.value, np.array([6.0, 3.0, 0.0]))


def test_pytree_arguments_outputs_and_state_values(close):
    s = smap.State({"m": jnp.zeros(2), "v": jnp.ones(2)})

    @smap.jit
    def f(inputs, scale):
        v = s.value
        s.value = {"m": v["m"] + inputs["a"], "v": v["v"] * scale}
        return {"sum": inputs["a"] + inputs["b"][0]}, [v["m"]]

    out = f({"a": jnp.array([1.0, 2.0]), "b": (jnp.array([3.0, 4.0]),)}, 2.0)
    close(out, ({"sum": np.array([4.0, 6.0])}, [np.zeros(2)]))
    close(s.value, {"m": np.array([1.0, 2.0]), "v": np.array([2.0, 2.0])})


def test_keyword_arguments(close):
    s = smap.State(jnp.zeros(2))

    @smap.jit
    def f(x, y=None, *, z):
        s.value = s.value + x * z
        return x + y

    close(f(jnp.ones(2), y=jnp.ones(2), z=jnp.array(3.0)), np.full(2, 2.0))
    close(s.value, np.full(2, 3.0))


def test_state_changed_outside_is_seen_by_the_next_call(close):
    s = smap.State(jnp.ones(2))
    f = smap.jit(lambda x: s.value * x)
    close(f(jnp.full(2, 2.0)), np.full(2, 2.0))
    s.value = jnp.array([5.0, 7.0])
    close(f(jnp.full(2, 2.0)), np.array([10.0, 14.0]))


def test_states_read_only_are_not_changed(close):
    a = smap.State(jnp.arange(3.0))
    f = smap.jit(lambda: a.value.sum())
    close(f(), 3.0)
    close(a.value, np.arange(3.0))


def test_states_read_depend_on_a_static_argument(close):
    a, b = smap.State(jnp.ones(2)), smap.State(jnp.full(2, 10.0))
    calls = []

    @smap.jit(static_argnums=1)
    def f(x, use_a):
        calls.append(use_a)
        state = a if use_a else b
        state.value = state.value + x
        return state.value

    close(f(jnp.ones(2), True), np.full(2, 2.0))
    close(f(jnp.ones(2), False), np.full(2, 11.0))
    close(f(jnp.ones(2), True), np.full(2, 3.0))
    close(a.value, np.full(2, 3.0))
    close(b.value, np.full(2, 11.0))
    assert calls == [True, False]


def test_module_attributes_are_kept(close):
    def documented(x):
        """Doc."""
        return x

    f = smap.jit(documented)
    assert f.__name__ == "documented" and f.__doc__ == "Doc."


# -- tracing once per signature ------------------------------------------------


def counting(fun):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return fun(*args, **kwargs)

    return wrapped, calls


def test_traced_once_per_signature(close):
    s = smap.State(jnp.zeros(3))

    def body(x):
        s.value = s.value + x
        return s.value

    fun, calls = counting(body)
    f = smap.jit(fun)
    for i in range(4):
        close(f(jnp.full(3, float(i))), np.full(3, float(sum(range(i + 1)))))
    assert len(calls) == 1


def test_python_scalar_values_do_not_retrace(close):
    fun, calls = counting(lambda x: x * 2)
    f = smap.jit(fun)
    close(f(1.0), 2.0)
    close(f(4.0), 8.0)
    assert len(calls) == 1


def test_retrace_on_shape_change():
    fun, calls = counting(lambda x: x.sum())
    f = smap.jit(fun)
    f(jnp.ones(3))
    f(jnp.ones(4))
    assert len(calls) == 2
    f(jnp.ones(3))
    f(jnp.ones(4))
    assert len(calls) == 2


def test_retrace_on_dtype_change():
    fun, calls = counting(lambda x: x + 1)
    f = smap.jit(fun)
    assert f(jnp.ones(2, jnp.float32)).dtype == jnp.float32
    assert f(jnp.ones(2, jnp.int32)).dtype == jnp.int32
    assert len(calls) == 2


def test_retrace_on_tree_structure_change(close):
    fun, calls = counting(lambda t: jax.tree_util.tree_reduce(lambda a, b: a + b, t))
    f = smap.jit(fun)
    close(f({"a": jnp.ones(()), "b": jnp.ones(())}), 2.0)
    close(f({"a": jnp.ones(()), "c": jnp.ones(())}), 2.0)
    close(f((jnp.ones(()), jnp.ones(()), jnp.ones(()))), 3.0)
    assert len(calls) == 3


def test_retrace_on_static_argument_value(close):
    fun, calls = counting(lambda x, n: x * n)
    f = smap.jit(fun, static_argnums=1)
    close(f(jnp.ones(2), 2), np.full(2, 2.0))
    close(f(jnp.ones(2), 3), np.full(2, 3.0))
    close(f(jnp.ones(2), 2), np.full(2, 2.0))
    assert len(calls) == 2


def test_retrace_when_a_state_shape_changes_by_reset(close):
    h = smap.HiddenState(jnp.zeros(3))

    def body(x):
        h.value = h.value + x
        return h.value.sum()

    fun, calls = counting(body)
    f = smap.jit(fun)
    close(f(1.0), 3.0)
    h.reset(jnp.zeros((2, 4)))
    close(f(1.0), 8.0)
    close(h.value, np.ones((2, 4)))
    assert len(calls) == 2
    h.reset(jnp.zeros(3))
    close(f(1.0), 3.0)
    assert len(calls) == 2


def test_retrace_when_a_state_dtype_changes_by_reset():
    h = smap.State(jnp.zeros(2))
    fun, calls = counting(lambda: h.value + 1)
    f = smap.jit(fun)
    assert f().dtype == jnp.float32
    h.reset(jnp.zeros(2, jnp.int32))
    assert f().dtype == jnp.int32
    assert len(calls) == 2


def test_state_value_changes_do_not_retrace():
    s = smap.State(jnp.zeros(2))
    fun, calls = counting(lambda: s.value.sum())
    f = smap.jit(fun)
    f()
    s.value = jnp.ones(2)
    assert float(f()) == 2.0
    assert len(calls) == 1


# -- static arguments and donation ---------------------------------------------


def test_static_argnums_allow_python_control_flow(close):
    def power(x, n):
        out = x
        for _ in range(n - 1):
            out = out * x
        return out

    f = smap.jit(power, static_argnums=1)
    close(f(jnp.array(2.0), 3), 8.0)
    close(f(jnp.array(2.0), 5), 32.0)


def test_negative_static_argnums(close):
    fun, calls = counting(lambda x, mode: x + 1 if mode == "inc" else x - 1)
    f = smap.jit(lambda x, mode: fun(x, mode), static_argnums=-1)
    close(f(jnp.ones(2), "inc"), np.full(2, 2.0))
    close(f(jnp.ones(2), "dec"), np.zeros(2))
    assert len(calls) == 2


def test_static_argnames(close):
    def f(x, *, mode):
        return x * 2 if mode == "double" else x

    g = smap.jit(f, static_argnames="mode")
    close(g(jnp.ones(2), mode="double"), np.full(2, 2.0))
    close(g(jnp.ones(2), mode="same"), np.ones(2))
    h = smap.jit(f, static_argnames=("mode",))
    close(h(jnp.ones(2), mode="double"), np.full(2, 2.0))


def test_static_argnums_and_argnames_together(close):
    def f(a, n, x, *, k):
        return x * n + k

    g = smap.jit(f, static_argnums=(0, 1), static_argnames="k")
    close(g("ignored", 3, jnp.ones(2), k=1), np.full(2, 4.0))


def test_static_argname_passed_positionally(close):
    def f(x, n):
        return x * len(range(n))

    close(jax.jit(f, static_argnames="n")(jnp.ones(2), 3), np.full(2, 3.0))
    close(smap.jit(f, static_argnames="n")(jnp.ones(2), 3), np.full(2, 3.0))


def test_static_argnum_passed_by_keyword(close):
    def f(x, n):
        return x * len(range(n))

    close(jax.jit(f, static_argnums=1)(jnp.ones(2), n=3), np.full(2, 3.0))
    close(smap.jit(f, static_argnums=1)(jnp.ones(2), n=3), np.full(2, 3.0))


@pytest.mark.parametrize("bad", [2, -3, (0, 5)])
def test_out_of_range_static_argnums_rejected_at_construction(bad):
    with pytest.raises(ValueError, match="static_argnums"):
        smap.jit(lambda x, y: x, static_argnums=bad)


def test_static_argnums_on_varargs_function(close):
    f = smap.jit(lambda *args: args[0] * args[1], static_argnums=1)
    close(f(jnp.ones(2), 3), np.full(2, 3.0))


def test_donate_argnums_accepted(close):
    s = smap.State(jnp.zeros(3))

    @smap.jit(donate_argnums=0)
    def f(buf, y):
        s.value = s.value + y
        return buf + y

    for i in range(1, 3):
        out = f(jnp.full(3, 10.0), jnp.full(3, float(i)))
        close(out, np.full(3, 10.0 + i))
    close(s.value, np.full(3, 3.0))
    g = smap.jit(lambda a, b: (a * b, a + b), donate_argnums=(0, 1))
    close(g(jnp.full(2, 2.0), jnp.full(2, 3.0)), (np.full(2, 6.0), np.full(2, 5.0)))


# -- failures leave states unchanged -------------------------------------------


def test_raising_function_leaves_every_state_unchanged(close):
    a, b = smap.State(jnp.ones(2)), smap.State(jnp.zeros(()))

    @smap.jit
    def f(x):
        a.value = a.value + x
        b.value = b.value + 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        f(jnp.ones(2))
    close(a.value, np.ones(2))
    close(b.value, 0.0)


def test_raise_on_a_new_signature_keeps_the_values_of_earlier_calls(close):
    s = smap.State(jnp.zeros(()))

    @smap.jit
    def f(x):
        s.value = s.value + x.sum()
        if x.shape[0] > 2:
            raise ValueError("too long")
        return s.value

    f(jnp.ones(2))
    f(jnp.ones(2))
    with pytest.raises(ValueError, match="too long"):
        f(jnp.ones(3))
    close(s.value, 4.0)
    close(f(jnp.ones(2)), 6.0)


def test_wrong_shape_write_inside_jit_names_the_state_and_changes_nothing(close):
    model = Model()
    before = {k: as_np(v.value) for k, v in model.states().items()}

    @smap.jit
    def bad(x):
        model(x)
        model.acc.value = jnp.zeros(5)

    with pytest.raises(ValueError, match=r"state 'acc'"):
        bad(jnp.ones(2))
    close({k: v.value for k, v in model.states().items()}, before)


def test_wrong_dtype_write_inside_jit_names_a_free_state(close):
    s = smap.State(jnp.zeros(2))

    @smap.jit
    def bad():
        s.value = jnp.zeros(2, jnp.int32)

    with pytest.raises(TypeError, match=r"State float32\[2\]"):
        bad()
    close(s.value, np.zeros(2))


def test_reset_inside_jit_changes_the_shape(close):
    h = smap.HiddenState(jnp.zeros(2))

    @smap.jit
    def grow(x):
        h.reset(jnp.concatenate([h.value, x]))

    grow(jnp.ones(3))
    close(h.value, np.array([0.0, 0.0, 1.0, 1.0, 1.0]))
    grow(jnp.full(3, 2.0))
    close(h.value, np.array([0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]))
    # A write (not a reset) is checked against the shape the state has now.
    add = smap.jit(lambda: setattr(h, "value", h.value + 1))
    add()
    close(h.value, np.array([1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]))


def test_state_created_inside_jit_and_kept_raises_when_read():
    kept = []

    @smap.jit
    def f(x):
        kept.append(smap.State(x * 2))
        return x + 1

    np.testing.assert_array_equal(np.asarray(f(jnp.ones(2))), np.full(2, 2.0))
    with pytest.raises(RuntimeError, match="created inside"):
        _ = kept[0].value
    # The error is stable: no later read hands out a leaked tracer.
    with pytest.raises(RuntimeError, match="created inside"):
        _ = kept[0].value


def test_state_created_inside_jit_can_be_used_there(close):
    @smap.jit
    def f(x):
        tmp = smap.State(jnp.zeros_like(x))
        tmp.value = tmp.value + x
        tmp.value = tmp.value * 3
        return tmp.value

    close(f(jnp.ones(2)), np.full(2, 3.0))


# -- nesting -------------------------------------------------------------------


def test_nested_jit_matches_pure_reference(close):
    model = Model()
    counted, calls = counting(model)
    inner = smap.jit(counted)
    extra = smap.State(jnp.zeros(()))

    @smap.jit
    def outer(x):
        a = inner(x)
        b = inner(x * 2)
        extra.value = extra.value + a + b
        return model.acc.value

    w, acc, count = model.w.value, model.acc.value, model.count.value
    total = 0.0
    for x in [jnp.array([1.0, 0.5]), jnp.array([-0.3, 0.2])]:
        out = outer(x)
        a, (w, acc, count) = pure_step(x, w, acc, count)
        b, (w, acc, count) = pure_step(x * 2, w, acc, count)
        total = total + a + b
        close(out, acc)
    close(model.acc.value, acc)
    close(extra.value, total)
    assert int(model.count.value) == 4
    # The inner function still works on its own, continuing from the same states.
    inner(jnp.ones(2))
    assert int(model.count.value) == 5
    # One signature: the inner function was traced once, inside and outside alike.
    assert len(calls) == 1


def test_nested_inner_raise_leaves_states_unchanged(close):
    s = smap.State(jnp.zeros(()))

    @smap.jit
    def inner(x):
        s.value = s.value + x
        return s.value

    @smap.jit
    def outer(x):
        inner(x)
        raise KeyError("outer failed")

    with pytest.raises(KeyError):
        outer(1.0)
    close(s.value, 0.0)
    close(inner(1.0), 1.0)


# -- cache key and jaxpr -------------------------------------------------------


def test_cache_key_and_closed_jaxpr(close):
    s = smap.State(jnp.arange(3.0))

    @smap.jit
    def f(x):
        s.value = s.value + x
        return s.value * 2

    x = jnp.ones(3)
    f(x)
    key = f.get_arg_cache_key(x)
    closed = f.get_jaxpr_by_cache(key)
    assert hasattr(closed, "jaxpr") and hasattr(closed, "consts")
    # Inputs: the argument, then the state; outputs: the result, then the written state.
    assert len(closed.jaxpr.invars) == 2
    assert len(closed.jaxpr.outvars) == 2
    outs = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, jnp.full(3, 5.0), jnp.arange(3.0))
    close(outs, [2 * (5.0 + np.arange(3.0)), 5.0 + np.arange(3.0)])


def test_cache_key_depends_on_the_signature():
    f = smap.jit(lambda x: x * 2)
    f(jnp.ones(2))
    f(jnp.ones(3))
    k2, k3 = f.get_arg_cache_key(jnp.ones(2)), f.get_arg_cache_key(jnp.ones(3))
    assert k2 != k3
    assert f.get_arg_cache_key(jnp.zeros(2)) == k2
    assert [v.aval.shape for v in f.get_jaxpr_by_cache(k2).jaxpr.invars] == [(2,)]
    assert [v.aval.shape for v in f.get_jaxpr_by_cache(k3).jaxpr.invars] == [(3,)]


def test_cache_key_for_an_uncalled_signature_has_no_jaxpr():
    f = smap.jit(lambda x: x * 2)
    f(jnp.ones(2))
    with pytest.raises(KeyError):
        f.get_jaxpr_by_cache(f.get_arg_cache_key(jnp.ones(5)))


def test_jaxpr_follows_a_state_reset():
    h = smap.HiddenState(jnp.zeros(2))

    @smap.jit
    def f():
        h.value = h.value + 1

    f()
    small = f.get_jaxpr_by_cache(f.get_arg_cache_key())
    h.reset(jnp.zeros((4, 2)))
    f()
    big = f.get_jaxpr_by_cache(f.get_arg_cache_key())
    assert [v.aval.shape for v in small.jaxpr.invars] == [(2,)]
    assert [v.aval.shape for v in big.jaxpr.invars] == [(4, 2)]


# -- under raw JAX transforms --------------------------------------------------


def test_writing_transform_inside_raw_jax_jit_is_a_clear_type_error(close):
    s = smap.State(jnp.zeros(2))

    @smap.jit
    def f(x):
        s.value = s.value + x
        return s.value

    with pytest.raises(TypeError, match=r"smap\.jit\(f\).*smap\.jit"):
        jax.jit(f)(jnp.ones(2))
    # No tracer leaked into the state, and it still works.
    close(s.value, np.zeros(2))
    close(f(jnp.ones(2)), np.ones(2))


def test_writing_grad_inside_raw_jax_jit_is_a_clear_type_error(close):
    w = smap.ParamState(jnp.ones(2))
    calls = smap.State(jnp.zeros(()))

    def loss(x):
        calls.value = calls.value + 1
        return (w.value * x).sum()

    g = smap.grad(loss, grad_states=w)
    with pytest.raises(TypeError, match="smap"):
        jax.jit(g)(jnp.ones(2))
    close(calls.value, 0.0)


def test_reading_transform_inside_raw_jax_jit_works(close):
    s = smap.State(jnp.array([1.0, 2.0]))
    f = smap.jit(lambda x: s.value * x)
    close(jax.jit(f)(jnp.full(2, 3.0)), np.array([3.0, 6.0]))


def test_raw_jax_jit_check_when_the_first_written_state_is_empty(close):
    empty = smap.State({})
    s = smap.State(jnp.zeros(2))

    @smap.jit
    def f(x):
        empty.value = {}
        s.value = s.value + x
        return x

    with pytest.raises(TypeError, match="smap"):
        jax.jit(f)(jnp.ones(2))
    close(s.value, np.zeros(2))


# -- a raw JAX transformation writing a State is refused at the write ----------

# name -> (the write, what the error proposes instead)
RAW_WRITES = {
    "jax.jit": (lambda s: jax.jit(lambda x: setattr(s, "value", x))(3.0), r"put smap\.jit around it"),
    "jax.vmap": (
        lambda s: jax.vmap(lambda x: setattr(s, "value", x))(jnp.ones(3)),
        r"map the function with smap\.vmap",
    ),
    "jax.grad": (lambda s: jax.grad(lambda x: (setattr(s, "value", x), x)[1])(3.0), r"differentiate with smap\.grad"),
    "jax.vmap inside smap.jit": (
        lambda s: smap.jit(lambda x: jax.vmap(lambda y: setattr(s, "value", y))(x))(jnp.ones(3)),
        r"smap\.jit, smap\.grad or smap\.vmap",  # (JAX's own refusal, quoted in the error, says why)
    ),
    "reset under jax.jit": (lambda s: jax.jit(lambda x: s.reset(x))(3.0), r"put smap\.jit around it"),
}


@pytest.mark.parametrize("name", list(RAW_WRITES))
def test_raw_jax_transform_writing_a_state_is_refused_naming_the_state(name, close):
    class Counter(smap.nn.Module):
        def __init__(self):
            self.total = smap.State(jnp.zeros(()))

    counter = Counter()
    counter.states()  # records the state's path, which errors name
    write, proposed = RAW_WRITES[name]
    with pytest.raises(TypeError, match=r"state 'total' \(State\) is written with a value traced.*" + proposed):
        write(counter.total)
    close(counter.total.value, 0.0)  # no tracer was stored: the state is usable
    counter.total.value = counter.total.value + 1
    close(counter.total.value, 1.0)


def test_raw_jax_jit_drawing_from_a_random_state_is_refused_and_keeps_the_key():
    rng = smap.random.RandomState(0)
    before = np.asarray(rng.value)
    with pytest.raises(TypeError, match=r"RandomState uint32\[2\] is written with a value traced"):
        jax.jit(lambda: rng.normal())()
    np.testing.assert_array_equal(np.asarray(rng.value), before)


def test_smap_transforms_nested_in_raw_jax_transforms_still_work(close):
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    h = smap.State(jnp.zeros(2))

    @smap.jit
    def step(x):
        h.value = h.value + x  # a write traced by smap.jit's own trace
        inner = smap.vmap(lambda v: v * w.value.sum())(x)  # smap.vmap inside smap.jit
        return (inner * w.value).sum()

    close(step(jnp.ones(2)), 9.0)
    close(h.value, np.ones(2))
    # smap.vmap reading states inside a raw jax.jit, and jax.grad over a reading smap.jit.
    close(jax.jit(smap.vmap(lambda v: v * w.value.sum()))(jnp.arange(2.0)), np.array([0.0, 3.0]))
    close(jax.grad(smap.jit(lambda x: (x * w.value).sum()))(jnp.ones(2)), w.value)
    # A state created inside a raw jax.jit lives in that trace: writing it there is allowed.
    close(jax.jit(lambda x: (s := smap.State(x), setattr(s, "value", s.value * 2), s.value)[-1])(3.0), 6.0)


# -- Modules as arguments; transforms defined in a class body are methods -------------


class Accumulator(smap.nn.Module):
    def __init__(self, scale):
        self.scale = smap.ParamState(jnp.asarray(scale))
        self.total = smap.LongTermState(jnp.zeros(()))

    @smap.jit
    def add(self, x):
        self.total.value = self.total.value + self.scale.value * x.sum()
        return self.total.value

    @functools.partial(smap.jit, static_argnums=0)
    def add_static(self, x):
        self.total.value = self.total.value + self.scale.value * x.sum()
        return self.total.value


@pytest.mark.parametrize("method", ["add", "add_static"])
def test_a_method_transformed_in_its_class_gets_its_instance_as_jax_jit_does(method):
    """As with jax.jit, the instance is the first argument; a Module is no array, its States found by tracing
    (marked static or not); each instance's states are its own, written back after each call."""
    a, b = Accumulator(2.0), Accumulator(-1.0)
    x = jnp.array([1.0, 2.0])
    np.testing.assert_allclose(getattr(a, method)(x), 6.0)
    np.testing.assert_allclose(getattr(a, method)(x), 12.0)
    np.testing.assert_allclose(getattr(b, method)(x), -3.0)
    np.testing.assert_allclose([a.total.value, b.total.value], [12.0, -3.0])
    assert getattr(Accumulator, method)(a, x) == 18.0  # through the class, the instance given
    assert getattr(Accumulator, method) is Accumulator.__dict__[method]  # on the class, the transform itself


def test_a_module_argument_is_traced_once_per_module_and_its_states_are_written_back():
    traces = []

    def step(model, batch):
        traces.append(model)
        model.total.value = model.total.value + model.scale.value * batch["x"].sum()
        return {"total": model.total.value}

    jitted = smap.jit(step)
    a, b = Accumulator(2.0), Accumulator(3.0)
    x = jnp.array([1.0, 2.0])
    for _ in range(2):
        jitted(a, {"x": x})
        jitted(b, batch={"x": x})
    assert traces == [a, b]  # once per Module (and call shape), as a static argument would be
    np.testing.assert_allclose([a.total.value, b.total.value], [12.0, 18.0])
    pair = smap.jit(lambda models, x: [step(m, {"x": x})["total"] for m in models])(
        [a, b], x
    )  # Modules inside a pytree too
    np.testing.assert_allclose(pair, [18.0, 27.0])
    assert jitted.get_jaxpr_by_cache(jitted.get_arg_cache_key(a, {"x": x})).jaxpr.invars  # (x and the states)


def test_grad_of_a_module_argument_names_grad_states_and_the_states_keep_their_values():
    a = Accumulator(2.0)

    def loss(model, x):
        model.total.value = model.total.value + 1
        return model.scale.value * jnp.sum(x**2)

    with pytest.raises(TypeError, match=r"argnums selects args\[0\], which holds a Module; .* grad_states="):
        smap.grad(loss)(a, jnp.ones(2))
    np.testing.assert_array_equal(a.total.value, 0.0)
    grads = smap.grad(loss, grad_states=a.states(smap.ParamState), argnums=1)(a, jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(grads[0]["scale"], 5.0)
    np.testing.assert_allclose(grads[1], [4.0, 8.0])
    np.testing.assert_array_equal(a.total.value, 1.0)


class Gate(smap.nn.Module):
    """A layer whose program depends on Python attributes: a flag and a scale."""

    def __init__(self, scale):
        self.w = smap.ParamState(jnp.array([1.0, 2.0]))
        self.scale = scale
        self.training = True

    def __call__(self, x):
        y = x * self.w.value * self.scale
        return y * 2.0 if self.training else y

    @smap.jit
    def jitted(self, x):
        return self(x)


class Stack(smap.nn.Module):
    def __init__(self):
        self.layers = [Gate(1.0), Gate(3.0)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("transform", [smap.jit, functools.partial(smap.jit, static_argnums=0), smap.vmap])
def test_a_module_argument_whose_attributes_change_is_traced_again(transform):
    """A program traced for a Module depends on its Python attributes, as an Equinox or NNX module's
    structure is part of their cache key: a flag set, a scale changed, a State or a layer replaced in a
    submodule is seen at the next call (the value is the eager call's), and setting a flag back reuses
    the program traced for it."""
    traces = []

    def run(model, x):
        traces.append(1)
        return model(x)

    mapped = transform(run) if transform is not smap.vmap else smap.vmap(run, in_axes=(None, 0))
    model = Stack()
    x = jnp.array([[1.0, -1.0], [0.5, 2.0]]) if transform is smap.vmap else jnp.array([1.0, -1.0])
    expected = (lambda: jax.vmap(model)(x)) if transform is smap.vmap else (lambda: model(x))
    edits = [
        lambda: setattr(model.layers[1], "training", False),
        lambda: setattr(model.layers[0], "scale", -2.0),
        lambda: setattr(model.layers[1], "w", smap.ParamState(jnp.array([5.0, 7.0]))),
        lambda: setattr(model, "layers", [model.layers[1]]),
        lambda: setattr(model.layers[0], "training", True),
        lambda: setattr(model.layers[0], "training", False),  # back: the program traced for it
    ]
    np.testing.assert_allclose(mapped(model, x), expected())
    for edit in edits:
        edit()
        np.testing.assert_allclose(mapped(model, x), expected())
    assert len(traces) == 6  # the last edit traced nothing
    smap.nn.Module().flag = 1  # another Module's attribute: this one's layout is read again, and is the same
    mapped(model, x)
    assert len(traces) == 6
    for _ in range(2):  # a NumPy scalar counts by value: a new but equal one traces nothing
        model.layers[0].scale = np.float32(0.5)
        np.testing.assert_allclose(mapped(model, x), expected())
    assert len(traces) == 7


def test_a_module_argument_traced_for_many_layouts_warns_once():
    """A Python attribute that changes at every call (a step count) retraces every call, as a static
    argument of jax.jit would: correct, and said once, with what to do."""
    gate = Gate(1.0)
    run = smap.jit(lambda model, x: model(x))
    x = jnp.array([1.0, 1.0])
    with pytest.warns(UserWarning, match=r"traced for 8 layouts of the same Gate.*Hold it in a State") as caught:
        for step in range(12):
            gate.scale = float(step)
            np.testing.assert_allclose(run(gate, x), gate(x))
    assert len([w for w in caught if "traced for 8 layouts" in str(w.message)]) == 1
    # Programs for other argument shapes of one layout are no changed attributes: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shapes = smap.jit(lambda model, x: model(x))
        for n in range(1, 11):
            np.testing.assert_allclose(shapes(gate, jnp.ones((n, 2))), gate(jnp.ones((n, 2))))


def test_a_tracer_left_on_a_module_argument_does_not_change_its_layout():
    """A method that keeps an intermediate on self (a tracer, after its trace) is traced once more for the new
    attribute, then not again: no later program can use a tracer of an earlier trace."""
    traces = []

    class Keeps(smap.nn.Module):
        def __init__(self):
            self.w = smap.ParamState(jnp.array([1.0, 2.0]))

        @smap.jit
        def __call__(self, x):
            traces.append(1)
            self.last = x * self.w.value
            return self.last

    keeps = Keeps()
    for _ in range(5):
        np.testing.assert_allclose(keeps(jnp.ones(2)), [1.0, 2.0])
    assert len(traces) == 2


def test_a_method_transform_sees_its_instance_flag():
    gate = Gate(1.0)
    x = jnp.array([1.0, 1.0])
    np.testing.assert_allclose(gate.jitted(x), [2.0, 4.0])
    gate.training = False  # an evaluation mode, as NNX's model.eval() sets
    np.testing.assert_allclose(gate.jitted(x), [1.0, 2.0])
    del gate.training
    with pytest.raises(AttributeError, match="training"):
        gate.jitted(x)


@pytest.mark.parametrize("static", [{"static_argnums": 1}, {"static_argnums": -1}, {"static_argnames": "y"}])
def test_an_argument_both_static_and_donated_is_refused_at_construction_as_in_jax_jit(static):
    def f(x, y):
        return x * y

    with pytest.raises(ValueError, match=r"donate_argnums and static_argnums cannot intersect.*\[1\]"):
        smap.jit(f, donate_argnums=1, **static)
    if static != {"static_argnums": -1}:  # (jax.jit before 0.10 resolves a negative index only at the call)
        with pytest.raises(ValueError, match="cannot intersect"):
            jax.jit(f, donate_argnums=1, **static)


def test_a_transform_reads_as_it_was_written():
    def loss(x):
        return x

    assert repr(smap.jit(loss)) == "smap.jit(loss)"
    assert repr(smap.grad(loss)) == "smap.grad(loss)"
    assert repr(smap.vmap(loss)) == "StatefulMapping(loss, axis_name=None, axis_size=None)"


def test_a_freed_module_argument_leaves_the_cache_and_the_call_reads_only_the_live_states():
    """A program traced for a Module is dropped once the Module is freed, its States with it: a transform
    called with many short-lived Modules does not read all their States on every later call."""
    import gc
    import weakref

    jitted = smap.jit(lambda model, x: model.add(x))
    keep = Accumulator(1.0)
    gone = []
    for _ in range(5):
        model = Accumulator(2.0)
        jitted(model, jnp.ones(2))
        gone.append(weakref.ref(model.total))
        del model
        gc.collect()
        jitted(keep, jnp.ones(2))
    np.testing.assert_allclose(keep.total.value, 10.0)
    assert sum(1 for ref in gone if ref() is not None) <= 1  # (the last Module's States until the next trace)
    assert len(jitted._state_list.states) <= 4  # keep's two States and at most the last Module's
