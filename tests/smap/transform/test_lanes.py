"""Tests of the lane-dependence analysis (``smap.transform._lanes``).

``lane_dependent`` decides, from a traced per-lane program, which outputs
differ between lanes. It may be conservative (call a value lane-dependent
when it is not) but never unsound: every output it calls lane-independent
must be equal in all lanes when the program runs under ``jax.vmap``. Each
case checks the expected answer and that soundness property.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap
from smap.transform._lanes import lane_dependent

AXIS = "i"
N = 3


def analyse(fn, args, inputs, axis_name=AXIS, extra_axes=()):
    env = ([(axis_name, N)] if axis_name is not None else []) + list(extra_axes)
    closed = jax.make_jaxpr(fn, axis_env=env or None)(*args)
    return lane_dependent(closed.jaxpr, inputs, axis_name)


def lane_outputs(fn, args, inputs, axis_name=AXIS):
    """Run `fn` under jax.vmap: dependent inputs get a different value per lane."""
    batched = [jnp.stack([a + (i + 1) * 0.37 for i in range(N)]) if d else a for a, d in zip(args, inputs)]
    in_axes = [0 if d else None for d in inputs]
    outs = jax.vmap(fn, in_axes=in_axes, axis_name=axis_name, axis_size=N)(*batched)
    return jax.tree_util.tree_leaves(outs)


def assert_sound(fn, args, inputs, dependent, axis_name=AXIS):
    for out, dep in zip(lane_outputs(fn, args, inputs, axis_name), dependent):
        if not dep:
            out = np.asarray(out)
            for lane in range(1, N):
                np.testing.assert_array_equal(out[lane], out[0])


x0 = jnp.array(1.5)
y0 = jnp.array(-0.5)
v0 = jnp.arange(3.0)
CONST = np.arange(100.0, dtype=np.float32)  # large enough to be a constvar, not a literal


def _scan_shift(x, c0):
    def body(carry, _):
        a, b = carry
        return (b, x), None

    (a, b), _ = jax.lax.scan(body, (c0, c0), None, length=3)
    return a, b


def _scan_counter(x, c0):
    return jax.lax.scan(lambda c, t: (c + t, c * x), c0, jnp.arange(3.0))


def _scan_dependent_xs(v, c0):
    return jax.lax.scan(lambda c, t: (c + 1.0, t * 2), c0, v)


def _scan_carry_from_xs(v, c0):
    return jax.lax.scan(lambda c, t: (c + t, c), c0, v)


def _while_independent_cond(x, y):
    return jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] + x, c[2] * 2), (0, y, y))


def _while_dependent_cond(x, y):
    return jax.lax.while_loop(lambda c: c[1] < x, lambda c: (c[0] + 1, c[1] + 1.0, c[2] * 2), (0, y, y))


def _while_shift(x, y):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[2], x + y), (0, y, y))


def _cond_dependent_pred(x, y):
    return jax.lax.cond(x > 0, lambda: y, lambda: y * 2)


def _cond_independent_pred(x, y):
    return jax.lax.cond(y > 0, lambda a: (a, 1.0), lambda a: (a * 2, 2.0), x)


def _switch_independent_index(x, y):
    branches = [lambda a: (a, y), lambda a: (a * 2, y + 1), lambda a: (-a, y * 3)]
    return jax.lax.switch(jnp.int32(1), branches, x)


def _cond_with_axis_index(x, y):
    return jax.lax.cond(y > 0, lambda: jax.lax.axis_index(AXIS) * 1.0, lambda: y)


def _nested_jit(x, y):
    return jax.jit(lambda a, b: (a * 2, b * 2, a + b))(x, y)


def _nested_jit_psum(x, y):
    return jax.jit(lambda a, b: (jax.lax.psum(a, AXIS), jax.lax.axis_index(AXIS) + b))(x, y)


@jax.custom_vjp
def _cube(a):
    return a**3


_cube.defvjp(lambda a: (a**3, a), lambda a, g: (3 * a**2 * g,))


def _custom_rules(x, y):
    return jax.nn.relu(x), jax.nn.relu(y), _cube(x), _cube(y)


def _remat(x, y):
    return jax.checkpoint(lambda a, b: (a * b, b * 2))(x, y)


def _linear_solve(x, y):
    def matvec(b):
        return b * 2.0

    def solve(matvec, b):
        return b / 2.0

    return jax.lax.custom_linear_solve(matvec, jnp.stack([x, x]), solve), jax.lax.custom_linear_solve(
        matvec, jnp.stack([y, y]), solve
    )


CASES = {
    # name: (fn, args, which inputs are per-lane, expected per-output dependence)
    "elementwise": (lambda x, y: (x + y, y * 2, x * 0 + 1), (x0, y0), [True, False], [True, False, True]),
    "passthrough": (lambda x, y: (y, x), (x0, y0), [True, False], [False, True]),
    "literal_output": (lambda x, y: (x, 3.0), (x0, y0), [True, False], [True, False]),
    "constvar": (lambda v, y: (CONST[:3] + v, CONST * 2), (v0, y0), [True, False], [True, False]),
    "nothing_per_lane": (lambda x, y: (x * y, jnp.sin(y)), (x0, y0), [False, False], [False, False]),
    "everything_per_lane": (lambda x, y: (x * y,), (x0, y0), [True, True], [True]),
    "psum": (lambda x, y: jax.lax.psum(x, AXIS), (x0, y0), [True, False], [False]),
    "pmean": (lambda x, y: x - jax.lax.pmean(x, AXIS), (x0, y0), [True, False], [True]),
    "pmean_alone": (lambda x, y: jax.lax.pmean(x, AXIS) * y, (x0, y0), [True, False], [False]),
    "pmax_pmin": (lambda x, y: (jax.lax.pmax(x, AXIS), jax.lax.pmin(x, AXIS)), (x0, y0), [True, False], [False, False]),
    "all_gather": (lambda x, y: jax.lax.all_gather(x, AXIS), (x0, y0), [True, False], [False]),
    "all_gather_tiled": (lambda v, y: jax.lax.all_gather(v, AXIS, tiled=True), (v0, y0), [True, False], [False]),
    "axis_index": (lambda x, y: jax.lax.axis_index(AXIS) * y, (x0, y0), [False, False], [True]),
    "psum_scatter": (lambda v, y: jax.lax.psum_scatter(v, AXIS), (v0, y0), [False, False], [True]),
    "psum_of_shared": (lambda x, y: jax.lax.psum(y, AXIS), (x0, y0), [True, False], [False]),
    "psum_two_operands": (lambda x, y: jax.lax.psum((x, y), AXIS), (x0, y0), [True, True], [False, False]),
    "scan_fixed_point": (_scan_shift, (x0, y0), [True, False], [True, True]),
    "scan_independent_carry": (_scan_counter, (x0, y0), [True, False], [False, True]),
    "scan_dependent_xs": (_scan_dependent_xs, (v0, y0), [True, False], [False, True]),
    "scan_carry_from_xs": (_scan_carry_from_xs, (v0, y0), [True, False], [True, True]),
    "scan_nothing_per_lane": (_scan_shift, (x0, y0), [False, False], [False, False]),
    "while_independent_cond": (_while_independent_cond, (x0, y0), [True, False], [False, True, False]),
    "while_dependent_cond": (_while_dependent_cond, (x0, y0), [True, False], [True, True, True]),
    "while_fixed_point": (_while_shift, (x0, y0), [True, False], [False, True, True]),
    "cond_dependent_pred": (_cond_dependent_pred, (x0, y0), [True, False], [True]),
    "cond_independent_pred": (_cond_independent_pred, (x0, y0), [True, False], [True, False]),
    "switch_independent_index": (_switch_independent_index, (x0, y0), [True, False], [True, False]),
    "cond_with_axis_index": (_cond_with_axis_index, (x0, y0), [False, False], [True]),
    "nested_jit": (_nested_jit, (x0, y0), [True, False], [True, False, True]),
    "nested_jit_collectives": (_nested_jit_psum, (x0, y0), [True, False], [False, True]),
    "custom_jvp_and_vjp": (_custom_rules, (x0, y0), [True, False], [True, False, True, False]),
    "remat": (_remat, (x0, y0), [False, True], [True, True]),
    "remat_shared": (_remat, (x0, y0), [True, False], [True, False]),
    "linear_solve": (_linear_solve, (x0, y0), [True, False], [True, False]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lane_dependence(case):
    fn, args, inputs, expected = CASES[case]
    assert analyse(fn, args, inputs) == expected
    assert_sound(fn, args, inputs, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_no_input_per_lane_means_no_output_per_lane_without_lane_collectives(case):
    fn, args, inputs, _ = CASES[case]
    closed = jax.make_jaxpr(fn, axis_env=[(AXIS, N)])(*args)
    result = lane_dependent(closed.jaxpr, [False] * len(inputs), AXIS)
    text = str(closed)
    if "axis_index" not in text and "reduce_scatter" not in text:
        assert result == [False] * len(result)
    assert_sound(fn, args, [False] * len(inputs), result)


def test_collectives_over_another_axis_are_not_reductions_over_this_one():
    def fn(x, y):
        return jax.lax.psum(x, "outer"), jax.lax.axis_index("outer") * y, jax.lax.psum(y, "outer")

    got = analyse(fn, (x0, y0), [True, False], extra_axes=[("outer", 2)])
    assert got == [True, False, False]


def test_reduction_over_both_axes_is_lane_independent():
    def fn(x, y):
        return jax.lax.psum(x, ("outer", AXIS)), jax.lax.pmax(x, ("outer",))

    assert analyse(fn, (x0, y0), [True, False], extra_axes=[("outer", 2)]) == [False, True]


def test_without_an_axis_name():
    def fn(x, y):
        return x * 2, y + 1

    assert analyse(fn, (x0, y0), [True, False], axis_name=None) == [True, False]


def test_inputs_are_matched_by_position():
    def fn(a, b, c):
        return a, b, c, a + c

    assert analyse(fn, (x0, y0, x0), [False, True, False]) == [False, True, False, False]
    assert analyse(fn, (x0, y0, x0), [True, False, False]) == [True, False, False, True]


# -- the analysis decides how mapped states are written back ----------------------


def test_a_state_whose_value_depends_on_the_lane_only_after_two_scan_steps_is_per_lane(close):
    total = smap.State(jnp.zeros(()))

    def step(x):
        total.value = _scan_shift(x, total.value)[0]
        return x

    before = np.asarray(total.value)
    with pytest.raises(smap.BatchAxisError):
        smap.vmap(step, unexpected_out_state_mapping="raise")(jnp.arange(3.0))
    np.testing.assert_array_equal(total.value, before)
    xs = jnp.array([1.0, 2.0, 4.0])
    smap.vmap(step)(xs)
    close(total.value, jax.vmap(lambda x: _scan_shift(x, jnp.zeros(()))[0])(xs))


def test_a_state_written_from_a_loop_over_shared_values_keeps_its_shape(close):
    total = smap.State(jnp.ones(2))
    scale = smap.ParamState(jnp.array(2.0))

    def step(x):
        def body(c):
            i, v = c
            return i + 1, v * scale.value

        _, total.value = jax.lax.while_loop(lambda c: c[0] < 3, body, (0, total.value))
        return x * 2

    out = smap.vmap(step, unexpected_out_state_mapping="raise")(jnp.arange(4.0))
    close(out, jnp.arange(4.0) * 2)
    close(total.value, jnp.full(2, 8.0))


def test_a_state_written_with_a_value_chosen_by_a_per_lane_predicate_is_per_lane(close):
    flag = smap.State(jnp.zeros(()))

    def step(x):
        flag.value = jax.lax.cond(x > 1, lambda: 1.0, lambda: 0.0)
        return x

    smap.vmap(step, state_out_axes=flag, unexpected_out_state_mapping="raise")(jnp.arange(4.0))
    close(flag.value, jnp.array([0.0, 0.0, 1.0, 1.0]))


def test_a_state_written_with_the_lane_index_is_per_lane(close):
    index = smap.State(jnp.zeros((), jnp.int32))

    def step():
        index.value = jax.lax.axis_index("b")
        return jnp.zeros(())

    smap.vmap(step, axis_size=5, axis_name="b", state_out_axes={0: index}, unexpected_out_state_mapping="raise")()
    np.testing.assert_array_equal(index.value, jnp.arange(5))
