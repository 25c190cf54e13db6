"""The seed tutorial's examples, with their printed values, and on other inputs against plain ``jax.vmap``.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap
from smap.filter import OfType
from smap.transform import StatefulMapping, vmap2

# -- helpers ---------------------------------------------------------------------


def lanes_reference(draw, lane_keys, *args):
    """Stack over lanes of `draw(RandomState(lane_key), *lane_args)`: what each lane should draw."""
    return jax.jit(jax.vmap(lambda k, *a: draw(smap.random.RandomState(k), *a)))(lane_keys, *args)


# -- the seed tutorial, with its printed values ------------------------------------


def test_tutorial_1_1_in_axes(capsys):
    def square(x):
        return x**2

    vmap_square = vmap2(square, in_axes=0)
    xs = jnp.array([1.0, 2.0, 3.0, 4.0])
    print("Input shape:", xs.shape)
    print("Output:", vmap_square(xs))
    print("Output shape:", vmap_square(xs).shape)

    def weighted_sum(x, weight):
        return x * weight

    vmap_weighted = vmap2(weighted_sum, in_axes=(0, None))
    batch_x = jnp.array([1.0, 2.0, 3.0])
    single_weight = 2.0
    result = vmap_weighted(batch_x, single_weight)
    print("Batched x:", batch_x)
    print("Single weight:", single_weight)
    print("Result:", result)

    def matrix_vector_product(matrix, vector):
        return matrix @ vector

    batch_matrices = jnp.ones((4, 3, 2))
    batch_vectors = jnp.ones((4, 2))
    vmap_matmul = vmap2(matrix_vector_product, in_axes=(0, 0))
    result = vmap_matmul(batch_matrices, batch_vectors)
    print("Input shapes:", batch_matrices.shape, batch_vectors.shape)
    print("Output shape:", result.shape)
    assert capsys.readouterr().out == (
        "Input shape: (4,)\n"
        "Output: [ 1.  4.  9. 16.]\n"
        "Output shape: (4,)\n"
        "Batched x: [1. 2. 3.]\n"
        "Single weight: 2.0\n"
        "Result: [2. 4. 6.]\n"
        "Input shapes: (4, 3, 2) (4, 2)\n"
        "Output shape: (4, 3)\n"
    )
    np.testing.assert_array_equal(result, jnp.full((4, 3), 2.0))


def test_tutorial_1_2_out_axes(capsys):
    def create_vector(scalar):
        return jnp.array([scalar, scalar * 2, scalar * 3])

    vmap_default = vmap2(create_vector, in_axes=0, out_axes=0)
    result_axis0 = vmap_default(jnp.array([1.0, 2.0]))
    print("out_axes=0, shape:", result_axis0.shape)
    print(result_axis0)
    vmap_axis1 = vmap2(create_vector, in_axes=0, out_axes=1)
    result_axis1 = vmap_axis1(jnp.array([1.0, 2.0]))
    print("\nout_axes=1, shape:", result_axis1.shape)
    print(result_axis1)
    assert capsys.readouterr().out == (
        "out_axes=0, shape: (2, 3)\n"
        "[[1. 2. 3.]\n"
        " [2. 4. 6.]]\n"
        "\n"
        "out_axes=1, shape: (3, 2)\n"
        "[[1. 2.]\n"
        " [2. 4.]\n"
        " [3. 6.]]\n"
    )


def test_tutorial_1_3_axis_name(capsys):
    def normalize_batch(x):
        batch_mean = jax.lax.pmean(x, axis_name="batch")
        return x - batch_mean

    vmap_normalize = vmap2(normalize_batch, in_axes=0, axis_name="batch")
    batch_data = jnp.array([1.0, 2.0, 3.0, 4.0])
    normalized = vmap_normalize(batch_data)
    print("Input:", batch_data)
    print("Batch mean:", jnp.mean(batch_data))
    print("Normalized:", normalized)
    print("New mean:", jnp.mean(normalized))
    assert capsys.readouterr().out == (
        "Input: [1. 2. 3. 4.]\nBatch mean: 2.5\nNormalized: [-1.5 -0.5  0.5  1.5]\nNew mean: 0.0\n"
    )


def test_tutorial_1_4_axis_size(capsys):
    def generate_sequence(unused=None):
        return jnp.arange(3)

    vmap_generate = vmap2(generate_sequence, in_axes=None, axis_size=5)
    result = vmap_generate()
    print("Generated sequences:")
    print(result)
    print("Shape:", result.shape)
    assert capsys.readouterr().out == (
        "Generated sequences:\n[[0 1 2]\n [0 1 2]\n [0 1 2]\n [0 1 2]\n [0 1 2]]\nShape: (5, 3)\n"
    )


def test_tutorial_1_5_state_axes(capsys):
    class Counter(smap.nn.Module):
        def __init__(self):
            super().__init__()
            self.count = smap.ShortTermState(jnp.zeros(4))

        def __call__(self, delta):
            self.count.value = self.count.value + delta
            return self.count.value

    counter = Counter()
    vmap_counter = vmap2(
        counter,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
    )
    deltas = jnp.array([1.0, 2.0, 3.0, 4.0])
    counts = vmap_counter(deltas)
    print("Deltas:", deltas)
    print("Counts:", counts)
    print("Final counter value:", counter.count.value)
    assert capsys.readouterr().out == (
        "Deltas: [1. 2. 3. 4.]\nCounts: [1. 2. 3. 4.]\nFinal counter value: [1. 2. 3. 4.]\n"
    )


def test_tutorial_1_6_module_states(capsys):
    class LinearLayer(smap.nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.weight = smap.ParamState(jnp.ones((in_features, out_features)))
            self.bias = smap.ParamState(jnp.zeros((out_features,)))

        def __call__(self, x):
            return x @ self.weight.value + self.bias.value

    layer = LinearLayer(3, 2)
    vmap_layer = vmap2(layer, in_axes=0, out_axes=0)
    batch_inputs = jnp.ones((4, 3))
    batch_outputs = vmap_layer(batch_inputs)
    print("Input shape:", batch_inputs.shape)
    print("Output shape:", batch_outputs.shape)
    print("Output:")
    print(batch_outputs)
    assert capsys.readouterr().out == (
        "Input shape: (4, 3)\nOutput shape: (4, 2)\nOutput:\n[[3. 3.]\n [3. 3.]\n [3. 3.]\n [3. 3.]]\n"
    )
    np.testing.assert_array_equal(layer.weight.value, jnp.ones((3, 2)))
    np.testing.assert_array_equal(layer.bias.value, jnp.zeros(2))


def test_tutorial_1_7_unexpected_out_state_mapping(capsys):
    temp_state = smap.ShortTermState(jnp.zeros(3))
    write_state = smap.LongTermState(jnp.asarray(0.0))

    def update_temp(x):
        temp_state.value = temp_state.value + x
        write_state.value = temp_state.value
        return temp_state.value

    vmap_proper = vmap2(
        update_temp,
        in_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
        unexpected_out_state_mapping="ignore",
    )
    try:
        vmap_proper(jnp.array([1.0, 2.0, 3.0]))
    except Exception as e:  # noqa: BLE001 - the tutorial prints any error; none is expected
        print(e)
    # The write state, not selected, is written back with the mapped axis at 0.
    np.testing.assert_array_equal(temp_state.value, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(write_state.value, [1.0, 2.0, 3.0])

    temp_state2 = smap.ShortTermState(jnp.array(0.0))
    write_state2 = smap.LongTermState(jnp.asarray(0.0))

    def update_temp2(x):
        temp_state2.value = temp_state2.value + x
        write_state2.value = temp_state2.value
        return temp_state2.value

    print("Before vmapping, original write state value:", write_state2.value)
    vmap_ignore = vmap2(update_temp2, in_axes=0, unexpected_out_state_mapping="ignore")
    result2 = vmap_ignore(jnp.array([1.0, 2.0, 3.0]))
    print("With 'ignore' policy:", result2)
    print("With 'ignore' policy, write state value after vmapping:", write_state2.value)
    assert capsys.readouterr().out == (
        "Before vmapping, original write state value: 0.0\n"
        "With 'ignore' policy: [1. 2. 3.]\n"
        "With 'ignore' policy, write state value after vmapping: [1. 2. 3.]\n"
    )
    np.testing.assert_array_equal(temp_state2.value, [1.0, 2.0, 3.0])


def test_tutorial_2_1_automatic_key_splitting(close):
    smap.random.seed(42)
    key_before = smap.random.DEFAULT.value

    def sample_normal(scale):
        return smap.random.normal(0.0, scale)

    scales = jnp.array([1.0, 2.0, 3.0, 4.0])
    samples = vmap2(sample_normal, in_axes=0)(scales)
    expected = lanes_reference(lambda rng, s: rng.normal(0.0, s), jax.random.split(key_before, 4), scales)
    close(samples, expected)
    assert len(set(np.asarray(samples / scales).tolist())) == 4

    smap.random.seed(123)
    key_before = smap.random.DEFAULT.value

    def sample_multiple(mean):
        sample1 = smap.random.uniform(0.0, 1.0)
        sample2 = smap.random.normal(mean, 1.0)
        return sample1 + sample2

    means = jnp.array([0.0, 1.0, 2.0])
    results = vmap2(sample_multiple, in_axes=0)(means)
    expected = lanes_reference(
        lambda rng, m: rng.uniform(0.0, 1.0) + rng.normal(m, 1.0), jax.random.split(key_before, 3), means
    )
    close(results, expected)


def test_tutorial_2_2_explicit_keys(capsys):
    def sample_with_jax_key(key, scale):
        return jax.random.normal(key, ()) * scale

    vmap_shared_key = vmap2(sample_with_jax_key, in_axes=(None, 0))
    shared_key = jax.random.PRNGKey(0)
    scales = jnp.array([1.0, 2.0, 3.0, 4.0])
    samples_shared = vmap_shared_key(shared_key, scales)
    print("Samples with shared key:", samples_shared)

    vmap_unique_keys = vmap2(sample_with_jax_key, in_axes=(0, 0))
    keys = jax.random.split(jax.random.PRNGKey(0), len(scales))
    samples_unique = vmap_unique_keys(keys, scales)
    print("Samples with unique keys:", samples_unique)
    shared_line, unique_line = capsys.readouterr().out.splitlines()
    # The tutorial's figures, to float32 round-off (JAX 0.12.1 draws the last digit differently).
    for line, label, want in (
        (shared_line, "Samples with shared key: ", [1.6226422, 3.2452843, 4.8679266, 6.4905686]),
        (unique_line, "Samples with unique keys: ", [1.0040143, -4.8849115, 3.8869078, -2.4877744]),
    ):
        assert line.startswith(label)
        np.testing.assert_allclose(np.array(line[len(label) :].strip("[]").split(), float), want, rtol=1e-6)


def test_tutorial_2_3_dropout(close):
    class Dropout(smap.nn.Module):
        def __init__(self, rate=0.5):
            super().__init__()
            self.rate = rate

        def __call__(self, x, training=True):
            if not training:
                return x
            keep_mask = smap.random.uniform(0.0, 1.0, x.shape) > self.rate
            return jnp.where(keep_mask, x / (1 - self.rate), 0.0)

    smap.random.seed(456)
    key_before = smap.random.DEFAULT.value
    dropout = Dropout(rate=0.3)
    vmap_dropout = vmap2(lambda x: dropout(x, training=True), in_axes=0)
    batch_data = jnp.ones((4, 5))
    dropped = vmap_dropout(batch_data)
    assert dropped.shape == (4, 5)
    values = np.asarray(dropped).ravel()
    assert np.all(np.isclose(values, 0.0) | np.isclose(values, 1 / 0.7))
    masks = lanes_reference(lambda rng: rng.uniform(0.0, 1.0, (5,)) > 0.3, jax.random.split(key_before, 4))
    close(dropped, jnp.where(masks, 1 / 0.7, 0.0))
    # Different rows get different patterns (for this seed).
    assert len({tuple(row) for row in np.asarray(dropped > 0).tolist()}) > 1


def test_tutorial_3_1_inspecting(capsys):
    accumulator = smap.ShortTermState(jnp.zeros(4))

    def accumulate(x):
        accumulator.value = accumulator.value + x
        return accumulator.value

    mapped_accumulate = vmap2(
        accumulate, in_axes=0, out_axes=0, axis_size=4, state_in_axes={0: OfType(smap.ShortTermState)}
    )
    print("Type:", type(mapped_accumulate))
    print("Origin function:", mapped_accumulate.origin_fun)
    print("in_axes:", mapped_accumulate.in_axes)
    print("out_axes:", mapped_accumulate.out_axes)
    print("state_in_axes:", mapped_accumulate.state_in_axes)
    print("state_out_axes:", mapped_accumulate.state_out_axes)
    print("axis_name:", mapped_accumulate.axis_name)
    print("axis_size:", mapped_accumulate.axis_size)
    out = capsys.readouterr().out
    assert re.fullmatch(
        r"Type: <class 'smap\.transform\.StatefulMapping'>\n"
        r"Origin function: <function (\S+\.)?accumulate at 0x[0-9a-fA-F]+>\n"
        r"in_axes: 0\n"
        r"out_axes: 0\n"
        r"state_in_axes: \{0: OfType\(<class 'smap\.ShortTermState'>\)\}\n"
        r"state_out_axes: \{\}\n"
        r"axis_name: None\n"
        r"axis_size: 4\n",
        out,
    ), out
    np.testing.assert_array_equal(mapped_accumulate(jnp.arange(4.0)), jnp.arange(4.0))
    np.testing.assert_array_equal(accumulator.value, jnp.arange(4.0))


def test_tutorial_3_2_caching(capsys):
    call_count = [0]

    def counting_function(x):
        call_count[0] += 1
        return x * 2

    vmap_counting = vmap2(counting_function, in_axes=0)
    print("Before first call, count:", call_count[0])
    result1 = vmap_counting(jnp.array([1.0, 2.0, 3.0]))
    print("After first call, count:", call_count[0], "(compilation trace)")
    call_count[0] = 0
    result2 = vmap_counting(jnp.array([4.0, 5.0, 6.0]))
    print("After second call, count:", call_count[0], "(no recompilation)")
    print("\nResults:")
    print("First:", result1)
    print("Second:", result2)
    assert capsys.readouterr().out == (
        "Before first call, count: 0\n"
        "After first call, count: 1 (compilation trace)\n"
        "After second call, count: 0 (no recompilation)\n"
        "\n"
        "Results:\n"
        "First: [2. 4. 6.]\n"
        "Second: [ 8. 10. 12.]\n"
    )


def test_tutorial_3_3_state_axis_inference(capsys):
    class StatefulComputation(smap.nn.Module):
        def __init__(self):
            super().__init__()
            self.temp = smap.ShortTermState(jnp.zeros(3))
            self.param = smap.ParamState(jnp.array(1.0))

        def __call__(self, x):
            self.temp.value = self.temp.value + x
            return self.temp.value * self.param.value

    model = StatefulComputation()
    vmap_model = vmap2(
        model,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
    )
    inputs = jnp.array([1.0, 2.0, 3.0])
    outputs = vmap_model(inputs)
    print("Inputs:", inputs)
    print("Outputs:", outputs)
    print("Final temp state:", model.temp.value)
    print("Param (unchanged):", model.param.value)
    assert capsys.readouterr().out == (
        "Inputs: [1. 2. 3.]\nOutputs: [1. 2. 3.]\nFinal temp state: [1. 2. 3.]\nParam (unchanged): 1.0\n"
    )


def test_tutorial_3_4_direct_statefulmapping(capsys):
    counter_state = smap.ShortTermState(jnp.zeros(3))

    def increment(delta):
        counter_state.value = counter_state.value + delta
        return counter_state.value

    custom_mapping = StatefulMapping(
        increment,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
        name="custom_increment",
        mapping_fn=functools.partial(jax.vmap, spmd_axis_name=None),
    )
    deltas = jnp.array([1.0, 2.0, 3.0])
    results = custom_mapping(deltas)
    print("Custom mapping results:", results)
    print("Final counter:", counter_state.value)
    assert capsys.readouterr().out == "Custom mapping results: [1. 2. 3.]\nFinal counter: [1. 2. 3.]\n"


def test_tutorial_3_5_jaxpr(close):
    simple_state = smap.State(jnp.array(1.0))

    def simple_op(x):
        result = x + simple_state.value
        simple_state.value = result
        return result * 2

    simple_vmap = vmap2(simple_op, in_axes=0, state_out_axes={0: OfType(smap.State)})
    test_input = jnp.array([1.0, 2.0])
    out = simple_vmap(test_input)
    cache_key = simple_vmap.get_arg_cache_key(test_input)
    jaxpr = simple_vmap.get_jaxpr_by_cache(cache_key)
    text = str(jaxpr)
    assert "lambda" in text and "add" in text and "mul" in text
    close(out, jnp.array([4.0, 6.0]))
    close(simple_state.value, jnp.array([2.0, 3.0]))
    lane = jax.core.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, jnp.array(5.0), jnp.array(1.0))
    close(lane, [jnp.array(12.0), jnp.array(6.0)])


def test_tutorial_4_1_nested(capsys):
    def matrix_elem_product(x, y):
        return x * y

    vmap_rows = vmap2(matrix_elem_product, in_axes=(0, 0))
    vmap_matrix = vmap2(vmap_rows, in_axes=(0, 0))
    matrix_a = jnp.ones((3, 4))
    matrix_b = jnp.arange(12).reshape(3, 4)
    result = vmap_matrix(matrix_a, matrix_b)
    print("Matrix A shape:", matrix_a.shape)
    print("Matrix B shape:", matrix_b.shape)
    print("Result shape:", result.shape)
    print("Result:")
    print(result)
    assert capsys.readouterr().out == (
        "Matrix A shape: (3, 4)\n"
        "Matrix B shape: (3, 4)\n"
        "Result shape: (3, 4)\n"
        "Result:\n"
        "[[ 0.  1.  2.  3.]\n"
        " [ 4.  5.  6.  7.]\n"
        " [ 8.  9. 10. 11.]]\n"
    )


def test_tutorial_4_2_jit_and_grad(capsys):
    from smap.transform import grad, jit

    def loss_fn(x, target):
        pred = x**2
        return jnp.sum((pred - target) ** 2)

    batched_grad = vmap2(grad(loss_fn, argnums=0), in_axes=(0, 0))
    batched_grad_jit = jit(batched_grad)
    batch_x = jnp.array([1.0, 2.0, 3.0])
    batch_targets = jnp.array([2.0, 4.0, 6.0])
    gradients = batched_grad_jit(batch_x, batch_targets)
    print("Inputs:", batch_x)
    print("Targets:", batch_targets)
    print("Gradients:", gradients)
    assert capsys.readouterr().out == ("Inputs: [1. 2. 3.]\nTargets: [2. 4. 6.]\nGradients: [-4.  0. 36.]\n")


# -- the tutorial's examples on other inputs, against plain jax.vmap --------------


@pytest.mark.parametrize("seed", [2])
def test_tutorial_examples_on_other_inputs(seed, close):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))

    def f32(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    # 1.1
    xs = f32(n)
    close(vmap2(lambda x: x**2)(xs), jax.vmap(lambda x: x**2)(xs))
    w = float(rng.normal())
    close(vmap2(lambda x, w: x * w, in_axes=(0, None))(xs, w), jax.vmap(lambda x, w: x * w, in_axes=(0, None))(xs, w))
    ms, vs = f32(n, 3, 2), f32(n, 2)
    close(vmap2(lambda m, v: m @ v, in_axes=(0, 0))(ms, vs), jax.vmap(lambda m, v: m @ v)(ms, vs))

    # 1.2
    def create_vector(s):
        return jnp.array([s, s * 2, s * 3])

    for out_axes in (0, 1, -1):
        close(vmap2(create_vector, out_axes=out_axes)(xs), jax.vmap(create_vector, out_axes=out_axes)(xs))

    # 1.3
    def normalize(x):
        return x - jax.lax.pmean(x, axis_name="batch")

    close(vmap2(normalize, axis_name="batch")(xs), jax.vmap(normalize, axis_name="batch")(xs))
    close(vmap2(normalize, axis_name="batch")(xs), xs - xs.mean())

    # 1.4
    close(vmap2(lambda: jnp.arange(3), in_axes=None, axis_size=n)(), jnp.tile(jnp.arange(3), (n, 1)))

    # 1.5 / 3.3 / 3.4: a batched counter against explicit state passing
    count0 = f32(n)
    count = smap.ShortTermState(count0)
    param = smap.ParamState(jnp.array(float(rng.normal())))

    def counter(delta):
        count.value = count.value + delta
        return count.value * param.value

    deltas = f32(n)
    expected_out, expected_count = jax.vmap(lambda c, d: ((c + d) * param.value, c + d))(count0, deltas)
    out = vmap2(
        counter, state_in_axes={0: OfType(smap.ShortTermState)}, state_out_axes={0: OfType(smap.ShortTermState)}
    )(deltas)
    close(out, expected_out)
    close(count.value, expected_count)

    # 1.6
    weight, bias = smap.ParamState(f32(3, 2)), smap.ParamState(f32(2))
    batch = f32(n, 3)
    close(
        vmap2(lambda x: x @ weight.value + bias.value)(batch),
        jax.vmap(lambda x, w, b: x @ w + b, in_axes=(0, None, None))(batch, weight.value, bias.value),
    )

    # 1.7 ('ignore'): a shared scalar written per lane gets the mapped axis at 0
    temp, write = smap.ShortTermState(jnp.array(0.0)), smap.LongTermState(jnp.array(0.0))

    def update(x):
        temp.value = temp.value + x
        write.value = temp.value
        return temp.value

    close(vmap2(update)(xs), xs)
    close(temp.value, xs)
    close(write.value, xs)

    # 2.2
    key = jax.random.PRNGKey(seed)
    scales = f32(n)

    def sample(k, s):
        return jax.random.normal(k, ()) * s

    close(vmap2(sample, in_axes=(None, 0))(key, scales), jax.vmap(sample, in_axes=(None, 0))(key, scales))
    keys = jax.random.split(key, n)
    close(vmap2(sample)(keys, scales), jax.vmap(sample)(keys, scales))

    # 4.1
    a, b = f32(n, 4), f32(n, 4)
    close(vmap2(vmap2(lambda x, y: x * y))(a, b), a * b)

    # 4.2
    def loss_fn(x, t):
        return jnp.sum((x**2 - t) ** 2)

    ts = f32(n)
    close(smap.jit(vmap2(smap.grad(loss_fn, argnums=0)))(xs, ts), jax.vmap(jax.grad(loss_fn))(xs, ts))
