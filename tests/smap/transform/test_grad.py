"""smap.grad against jax.grad of the equivalent pure function."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


class MLP(smap.nn.Module):
    def __init__(self):
        self.w1 = smap.ParamState(jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7]]))
        self.b1 = smap.ParamState(jnp.array([0.1, -0.2, 0.3]))
        self.w2 = smap.ParamState(jnp.array([[1.0], [-0.5], [2.0]]))
        self.mean = smap.LongTermState(jnp.zeros(3))

    def loss(self, x, y):
        h = jnp.tanh(x @ self.w1.value + self.b1.value)
        self.mean.value = 0.9 * self.mean.value + 0.1 * h.mean(0)
        pred = h @ self.w2.value
        return jnp.mean((pred - y) ** 2), {"h": h.sum()}


PARAM_NAMES = ("w1", "b1", "w2")


def pure_loss(params, x, y, mean):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    new_mean = 0.9 * mean + 0.1 * h.mean(0)
    pred = h @ params["w2"]
    return jnp.mean((pred - y) ** 2), ({"h": h.sum()}, new_mean)


X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-0.3, 0.8], [2.0, 0.1]])
Y = jnp.array([[0.3], [-0.2], [1.0], [0.0]])


def reference(model, x=X, y=Y):
    """value, aux, param grads (dict), x grad, y grad and the new mean, from pure JAX."""
    params = {k: model.states()[k].value for k in PARAM_NAMES}
    (value, (aux, new_mean)), (g_params, gx, gy) = jax.value_and_grad(pure_loss, argnums=(0, 1, 2), has_aux=True)(
        params, x, y, model.mean.value
    )
    return value, aux, g_params, gx, gy, new_mean


def grad_states_of(model, kind):
    if kind is None:
        return None
    if kind == "single":
        return model.w1
    if kind == "list":
        return [model.w1, model.b1, model.w2]
    if kind == "tuple":
        return (model.w2, model.w1)
    if kind == "dict":
        return model.states(smap.ParamState)
    raise AssertionError(kind)


def expected_state_grads(kind, g_params):
    return {
        "single": g_params["w1"],
        "list": [g_params["w1"], g_params["b1"], g_params["w2"]],
        "tuple": (g_params["w2"], g_params["w1"]),
        "dict": {k: g_params[k] for k in PARAM_NAMES},
    }[kind]


def expected_arg_grads(argnums, gx, gy):
    by_position = [gx, gy]
    if isinstance(argnums, int):
        return by_position[argnums]
    return tuple(by_position[i] for i in argnums)


# Every grad_states form with every argnums form; then every return_value/has_aux
# combination on a few of them (each case compiles, so not the full product).
STRUCTURES = [(kind, argnums) for kind in (None, "single", "list", "tuple", "dict") for argnums in (None, 0, 1, (0, 1))]
STRUCTURES += [("single", (1,)), ("dict", (1, 0))]
CASES = [pytest.param(kind, argnums, False, False) for kind, argnums in STRUCTURES]
CASES += [
    pytest.param(kind, argnums, rv, aux)
    for kind, argnums in [(None, None), ("dict", None), ("list", (0, 1)), ("single", 1)]
    for rv, aux in [(True, False), (False, True), (True, True)]
]


@pytest.mark.parametrize("kind, argnums, return_value, has_aux", CASES)
def test_grad_matches_jax_grad(kind, argnums, return_value, has_aux, close):
    model = MLP()
    value, aux, g_params, gx, gy, new_mean = reference(model)

    if has_aux:
        loss = model.loss
    else:
        loss = lambda x, y: model.loss(x, y)[0]  # noqa: E731
    g = smap.grad(
        loss, grad_states=grad_states_of(model, kind), argnums=argnums, has_aux=has_aux, return_value=return_value
    )
    result = g(X, Y)

    # The contract: state grads, arg grads, or (state_grads, arg_grads);
    # then (grads, value) with return_value; aux last with has_aux.
    if kind is None:
        grads = expected_arg_grads(0 if argnums is None else argnums, gx, gy)
    elif argnums is None:
        grads = expected_state_grads(kind, g_params)
    else:
        grads = (expected_state_grads(kind, g_params), expected_arg_grads(argnums, gx, gy))
    expected = (grads,)
    if return_value:
        expected += (value,)
    if has_aux:
        expected += (aux,)
    expected = expected[0] if len(expected) == 1 else expected

    close(result, expected, rtol=1e-5, atol=1e-6)
    # The state the loss writes is written back, once.
    close(model.mean.value, new_mean)


def test_grad_states_dict_keys_follow_module_states(close):
    model = MLP()
    g = smap.grad(lambda x, y: model.loss(x, y)[0], grad_states=model.states(smap.ParamState))
    grads = g(X, Y)
    assert list(grads) == ["w1", "b1", "w2"]
    _, _, g_params, _, _, _ = reference(MLP())
    close(grads, g_params, rtol=1e-5)


def test_default_argnums_is_zero(close):
    f = lambda x, y: jnp.sum(jnp.sin(x) * y)  # noqa: E731
    x, y = jnp.array([0.1, 0.2]), jnp.array([3.0, 4.0])
    close(smap.grad(f)(x, y), jax.grad(f)(x, y))


def test_grad_wrt_pytree_argument(close):
    f = lambda p, x: jnp.sum(p["a"] * x) + p["b"] ** 2  # noqa: E731
    p, x = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}, jnp.array([4.0, 5.0])
    close(smap.grad(f)(p, x), jax.grad(f)(p, x))


def test_negative_argnums(close):
    f = lambda x, y: jnp.sum(x * y**2)  # noqa: E731
    x, y = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    close(smap.grad(f, argnums=-1)(x, y), jax.grad(f, argnums=1)(x, y))


def test_grad_of_a_state_holding_a_pytree(close):
    params = smap.ParamState({"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)})

    def loss(x):
        p = params.value
        return jnp.sum(jnp.tanh(p["w"] * x + p["b"]))

    def pure(p, x):
        return jnp.sum(jnp.tanh(p["w"] * x + p["b"]))

    x = jnp.array([0.3, 0.7])
    close(smap.grad(loss, grad_states=params)(x), jax.grad(pure)(params.value, x))


def test_unused_grad_state_gets_zero_gradient(close):
    used = smap.ParamState(jnp.array([1.0, 2.0]))
    unused = smap.ParamState(jnp.array([[5.0, 6.0, 7.0]]))
    unused_int_shape = smap.ParamState(jnp.zeros(()))

    def loss(x):
        return jnp.sum(used.value * x)

    grads = smap.grad(loss, grad_states={"used": used, "unused": unused, "scalar": unused_int_shape})(
        jnp.array([3.0, 4.0])
    )
    close(grads, {"used": np.array([3.0, 4.0]), "unused": np.zeros((1, 3)), "scalar": np.zeros(())})


def test_only_unused_grad_state(close):
    unused = smap.ParamState(jnp.ones(2))
    g, value = smap.grad(lambda x: jnp.sum(x**2), grad_states=unused, return_value=True)(jnp.array([1.0, 2.0]))
    close(g, np.zeros(2))
    close(value, 5.0)


def test_non_differentiated_states_are_constants(close):
    w = smap.ParamState(jnp.array(2.0))
    c = smap.State(jnp.array(3.0))
    grads = smap.grad(lambda x: w.value * c.value * x, grad_states=w)(jnp.array(5.0))
    close(grads, 15.0)
    assert float(c.value) == 3.0


def test_states_written_in_the_loss_are_written_back(close):
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    calls = smap.State(jnp.zeros((), jnp.int32))
    last = smap.State(jnp.zeros(2))

    def loss(x):
        calls.value = calls.value + 1
        last.value = w.value * x
        return jnp.sum(last.value**2)

    g = smap.grad(loss, grad_states=w)
    for i in range(1, 4):
        x = jnp.array([float(i), 1.0])
        close(g(x), 2 * w.value * x**2)
        close(last.value, w.value * x)
        assert int(calls.value) == i


def test_grad_states_are_not_changed(close):
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    smap.grad(lambda: jnp.sum(w.value**2), grad_states=w)()
    close(w.value, np.array([1.0, 2.0]))


def test_traced_once_per_signature():
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    calls = []

    def loss(x):
        calls.append(1)
        return jnp.sum(w.value * x)

    g = smap.grad(loss, grad_states=w)
    g(jnp.ones(2))
    g(jnp.zeros(2))
    assert len(calls) == 1
    g(jnp.ones((3, 2)))
    assert len(calls) == 2


def test_grad_follows_state_values_between_calls(close):
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    g = smap.grad(lambda x: jnp.sum(w.value**2 * x), grad_states=w)
    close(g(jnp.ones(2)), np.array([2.0, 4.0]))
    w.value = jnp.array([3.0, -1.0])
    close(g(jnp.ones(2)), np.array([6.0, -2.0]))


# -- errors --------------------------------------------------------------------


def test_non_scalar_loss_is_a_type_error_naming_the_function():
    w = smap.ParamState(jnp.ones(2))

    def vector_loss(x):
        return w.value * x

    with pytest.raises(TypeError, match=r"vector_loss.*scalar"):
        smap.grad(vector_loss, grad_states=w)(jnp.ones(2))
    with pytest.raises(TypeError, match="vector_loss"):
        smap.grad(vector_loss)(jnp.ones(2))


def test_integer_loss_is_a_type_error():
    def int_loss(x):
        return jnp.sum(x).astype(jnp.int32)

    with pytest.raises(TypeError, match="int_loss"):
        smap.grad(int_loss)(jnp.ones(2))


def test_an_integer_state_or_argument_to_differentiate_is_named():
    class Net(smap.nn.Module):
        def __init__(self):
            self.count = smap.ParamState(jnp.arange(3))
            self.mixed = smap.ParamState({"w": jnp.ones(3), "steps": jnp.zeros((), jnp.int32)})

    net = Net()
    before = jax.tree_util.tree_map(np.asarray, {k: s.value for k, s in net.states().items()})

    def loss(x, extra):
        net.mixed.value = {"w": net.mixed.value["w"] * 2, "steps": net.mixed.value["steps"] + 1}
        return jnp.sum(net.count.value * x) + net.mixed.value["w"].sum() + extra["k"]

    x, extra = jnp.ones(3), {"k": 3}
    with pytest.raises(TypeError, match=r"state 'count' \(ParamState\) has dtype int32; only float and complex"):
        smap.grad(loss, grad_states=net.count)(x, extra)
    with pytest.raises(TypeError, match=r"state 'mixed' \(ParamState\), leaf \['steps'\], has dtype int32"):
        smap.grad(loss, grad_states={"mixed": net.mixed})(x, extra)
    with pytest.raises(TypeError, match=r"args\[0\] has dtype int32"):
        smap.grad(loss, argnums=0)(jnp.arange(3), extra)
    with pytest.raises(TypeError, match=r"args\[1\]\['k'\] has dtype int32"):
        smap.grad(loss, argnums=(0, 1))(x, extra)
    after = jax.tree_util.tree_map(np.asarray, {k: s.value for k, s in net.states().items()})
    jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)


def test_has_aux_needs_a_pair():
    def not_a_pair(x):
        return jnp.sum(x)

    with pytest.raises(TypeError, match="not_a_pair"):
        smap.grad(not_a_pair, has_aux=True)(jnp.ones(2))


def test_failed_grad_leaves_states_unchanged(close):
    s = smap.State(jnp.zeros(2))

    def vector_loss(x):
        s.value = s.value + 1
        return x * 2

    with pytest.raises(TypeError):
        smap.grad(vector_loss)(jnp.ones(2))
    close(s.value, np.zeros(2))


def test_out_of_range_argnums():
    with pytest.raises(ValueError, match="argnums"):
        smap.grad(lambda x: jnp.sum(x), argnums=3)(jnp.ones(2))


def test_grad_states_must_be_states():
    with pytest.raises(TypeError):
        smap.grad(lambda x: jnp.sum(x), grad_states=[jnp.ones(2)])
    with pytest.raises(TypeError):
        smap.grad(lambda x: jnp.sum(x), grad_states=3)


# -- forms and composition -----------------------------------------------------


def test_decorator_form(close):
    model = MLP()
    _, _, g_params, gx, _, _ = reference(model)

    @smap.grad(grad_states=model.states(smap.ParamState), argnums=0)
    def g(x, y):
        return model.loss(x, y)[0]

    state_grads, x_grad = g(X, Y)
    close(state_grads, g_params, rtol=1e-5)
    close(x_grad, gx, rtol=1e-5)


def test_decorator_form_with_has_aux_and_return_value(close):
    model = MLP()
    value, aux, g_params, _, _, _ = reference(model)

    @smap.grad(grad_states=[model.w2], has_aux=True, return_value=True)
    def g(x, y):
        return model.loss(x, y)

    grads, loss_value, aux_out = g(X, Y)
    close(grads, [g_params["w2"]], rtol=1e-5)
    close(loss_value, value)
    close(aux_out, aux)


def test_grad_inside_smap_jit_training_loop(close):
    model = MLP()
    params = model.states(smap.ParamState)
    lr = 0.1

    @smap.jit
    def train_step(x, y):
        grads, value = smap.grad(lambda x, y: model.loss(x, y)[0], grad_states=params, return_value=True)(x, y)
        for name, state in params.items():
            state.value = state.value - lr * grads[name]
        return value

    @jax.jit
    def pure_step(p, mean, x, y):
        (value, (_, new_mean)), grads = jax.value_and_grad(pure_loss, has_aux=True)(p, x, y, mean)
        return value, jax.tree_util.tree_map(lambda a, g: a - lr * g, p, grads), new_mean

    p = {k: params[k].value for k in PARAM_NAMES}
    mean = model.mean.value
    for i in range(3):
        x, y = X * (i + 1), Y - i
        out = train_step(x, y)
        expected, p, mean = pure_step(p, mean, x, y)
        close(out, expected, rtol=1e-5)
        close({k: params[k].value for k in PARAM_NAMES}, p, rtol=1e-5)
        close(model.mean.value, mean, rtol=1e-5)


def test_grad_through_an_inner_smap_jit(close):
    w = smap.ParamState(jnp.array([1.0, -2.0, 0.5]))
    predict = smap.jit(lambda x: jnp.tanh(w.value * x))
    g = smap.grad(lambda x: jnp.sum(predict(x) ** 2), grad_states=w, argnums=0)
    x = jnp.array([0.3, 0.1, 2.0])
    pure = lambda w, x: jnp.sum(jnp.tanh(w * x) ** 2)  # noqa: E731
    close(g(x), jax.grad(pure, argnums=(0, 1))(w.value, x), rtol=1e-5)


def test_grad_inside_smap_jit_sees_earlier_writes_of_the_same_call(close):
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    g = smap.grad(lambda x: jnp.sum(w.value**2 * x), grad_states=w)

    @smap.jit
    def step(x):
        w.value = w.value * 2
        return g(x)

    # d/dw sum(w^2 x) = 2 w x, at the doubled w.
    close(step(jnp.array([1.0, 3.0])), np.array([4.0, 24.0]))
    close(w.value, np.array([2.0, 4.0]))


def test_writes_of_an_inner_smap_jit_are_written_back_by_grad(close):
    count = smap.State(jnp.zeros(()))

    @smap.jit
    def triple(x):
        count.value = count.value + 1
        return x * 3

    g = smap.grad(lambda x: jnp.sum(triple(x) ** 2))
    close(g(jnp.array([1.0, 2.0])), np.array([18.0, 36.0]))
    close(count.value, 1.0)
    g(jnp.array([1.0, 2.0]))
    close(count.value, 2.0)


def test_grad_state_written_by_the_loss(close):
    v = smap.ParamState(jnp.array(3.0))

    def loss(x):
        out = v.value * x
        v.value = v.value + 1
        return out

    # The gradient is taken at the value before the call; the write lands after it.
    close(smap.grad(loss, grad_states=v, argnums=0)(jnp.array(2.0)), (2.0, 3.0))
    close(v.value, 4.0)


def test_grad_of_a_module_method_and_a_module(close):
    class Quadratic(smap.nn.Module):
        def __init__(self):
            self.a = smap.ParamState(jnp.array(3.0))

        def __call__(self, x):
            return self.a.value * x**2

    q = Quadratic()
    close(smap.grad(q, grad_states=q.a, argnums=0)(jnp.array(2.0)), (4.0, 12.0))


def test_second_order_through_jax_grad_free_function(close):
    # A grad with respect to arguments only, differentiated by smap.grad again.
    f = lambda x: jnp.sum(x**3)  # noqa: E731
    x = jnp.array([1.0, 2.0])
    hess_diag = smap.grad(lambda x: jnp.sum(smap.grad(f)(x)))(x)
    close(hess_diag, 6 * x)


def test_grad_around_a_mapping_equals_jax_grad_of_the_vmapped_loss(close):
    """smap.grad of a loss computed by a StatefulMapping: the gradient of a batch mean."""
    w = smap.ParamState(jnp.array([[1.0, -2.0], [0.5, 3.0]]))
    xs = jnp.arange(6.0).reshape(3, 2)

    per_example = smap.vmap(lambda x: jnp.sum(jnp.tanh(x @ w.value)))
    grads = smap.grad(lambda: jnp.mean(per_example(xs)), grad_states=w)()

    def reference(w_value):
        return jnp.mean(jax.vmap(lambda x: jnp.sum(jnp.tanh(x @ w_value)))(xs))

    close(grads, jax.grad(reference)(w.value))


# -- custom rules: JAX calls them after the trace --------------------------------------


@jax.custom_jvp
def scaled_sin(x, w):
    return jnp.sin(x * w)


@scaled_sin.defjvp
def _scaled_sin_jvp(primals, tangents):
    (x, w), (tx, tw) = primals, tangents
    return scaled_sin(x, w), jnp.cos(x * w) * (w * tx + x * tw)


def test_a_custom_jvp_function_given_a_states_value_differentiates_it_after_a_write():
    w0, x = jnp.array([1.0, 2.0]), jnp.array([0.3, -0.7])
    w = smap.ParamState(w0)

    def loss(x):
        w.value = 3 * w.value
        return scaled_sin(x, w.value).sum()

    grads = smap.grad(loss, grad_states=w, argnums=0)(x)
    want = jax.grad(lambda w, x: jnp.sin(x * 3 * w).sum(), argnums=(0, 1))(w0, x)
    np.testing.assert_allclose(grads[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(grads[1], want[1], rtol=1e-6)
    np.testing.assert_allclose(w.value, 3 * w0)


def _custom_jvp_reading(state):
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x * state.value)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (tx,) = primals, tangents
        return f(x), jnp.cos(x * state.value) * state.value * tx

    return f


def _custom_vjp_reading(state, where):
    @jax.custom_vjp
    def f(x):
        return x * state.value

    def fwd(x):
        return x * (state.value if where == "fwd" else 2.0), None

    def bwd(_, cotangent):
        return (cotangent * (state.value if where == "bwd" else 2.0),)

    f.defvjp(fwd, bwd)
    return f


CUSTOM_RULES_READING = {
    "custom_jvp's jvp": _custom_jvp_reading,
    "custom_vjp's fwd": lambda state: _custom_vjp_reading(state, "fwd"),
    "custom_vjp's bwd": lambda state: _custom_vjp_reading(state, "bwd"),
}


@pytest.mark.parametrize("rule", CUSTOM_RULES_READING)
def test_a_custom_rule_reading_a_state_is_refused_and_every_state_keeps_its_value(rule):
    """The rule runs when smap.grad differentiates the traced program: reading the state there would bake a
    stale value in (the write before it unseen, a later value of the state ignored) with no gradient."""
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    count = smap.LongTermState(jnp.zeros(()))
    f = CUSTOM_RULES_READING[rule](w)

    def loss(x):
        count.value = count.value + 1
        w.value = 3 * w.value
        return f(x).sum()

    with pytest.raises(TypeError, match=r"ParamState float32\[2\] is used inside a custom rule .* f\(x, state.value\)"):
        smap.grad(loss)(jnp.ones(2))
    np.testing.assert_array_equal(w.value, [1.0, 2.0])
    np.testing.assert_array_equal(count.value, 0.0)


def test_a_custom_rule_reading_a_state_is_refused_inside_another_transform():
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    f = _custom_jvp_reading(w)
    per_example = smap.vmap(smap.grad(lambda x: f(x).sum()))
    with pytest.raises(TypeError, match="is used inside a custom rule"):
        per_example(jnp.ones((3, 2)))
    np.testing.assert_array_equal(w.value, [1.0, 2.0])


def test_a_custom_jvp_function_reading_a_state_runs_where_nothing_differentiates_it():
    """Without differentiation JAX never calls the rule: the function reads the state as any function does."""
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    f = _custom_jvp_reading(w)
    np.testing.assert_allclose(smap.jit(f)(jnp.ones(2)), jnp.sin(jnp.array([1.0, 2.0])), rtol=1e-6)
    w.value = jnp.array([5.0, 6.0])
    np.testing.assert_allclose(smap.jit(f)(jnp.ones(2)), jnp.sin(jnp.array([5.0, 6.0])), rtol=1e-6)
    # jax.grad inside the trace calls the rule there, as plain JAX does: the state's value of that moment
    g = smap.jit(jax.grad(lambda x: f(x).sum()))
    np.testing.assert_allclose(g(jnp.ones(2)), jnp.cos(jnp.array([5.0, 6.0])) * jnp.array([5.0, 6.0]), rtol=1e-6)


@pytest.mark.parametrize(
    "options",
    [{}, {"argnums": 0}, {"argnums": (0,), "return_value": True}, {"has_aux": True, "return_value": True}],
)
@pytest.mark.parametrize("as_list", [False, True])
def test_a_cached_call_returns_the_gradients_as_the_program_made_them(close, options, as_list):
    """With a State or a list of them, the result is assembled inside the program: a cached call runs no
    Python of smap.grad's after JAX's dispatch, and returns what jax.grad returns."""
    w = smap.ParamState(jnp.array([1.0, -2.0]))
    x = jnp.array([0.5, 0.25])

    def loss(x):
        value = jnp.sum(jnp.tanh(x * w.value) ** 2)
        return (value, {"x": 2 * x}) if options.get("has_aux") else value

    g = smap.grad(loss, grad_states=[w] if as_list else w, **options)
    g(x)
    called = []
    sys.setprofile(lambda frame, event, _: called.append(frame.f_code.co_filename) if event == "call" else None)
    try:
        got = g(x)
    finally:
        sys.setprofile(None)
    assert not [f for f in called if f.endswith("_grad.py")]

    pure = lambda w, x: jnp.sum(jnp.tanh(x * w) ** 2)  # noqa: E731
    state_grad = jax.grad(pure)(w.value, x)
    state_grad = [state_grad] if as_list else state_grad
    if "argnums" in options:
        arg_grad = jax.grad(pure, argnums=1)(w.value, x)
        want = (state_grad, arg_grad if options["argnums"] == 0 else (arg_grad,))
    else:
        want = state_grad
    if options.get("return_value"):
        want = (want, pure(w.value, x))
    if options.get("has_aux"):
        want = (*want, {"x": 2 * x})
    close(got, want)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
