"""Calls from several threads: no write lost, no random key used twice, the
result of some sequential order; calls on disjoint states do not wait on each other."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap

THREADS, CALLS = 4, 25


def run_in_threads(call, threads=THREADS, calls=CALLS):
    """``call()`` ``calls`` times in each of ``threads`` threads started together; all results."""
    start = threading.Barrier(threads, timeout=60)
    results, errors = [], []

    def work():
        try:
            start.wait()
            for _ in range(calls):
                results.append(call())
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not any(w.is_alive() for w in workers), "a thread did not finish"
    assert not errors, errors
    return results


def reference_draws(seed, n, per_lane):
    """The draw of each of n successive calls from a RandomState seeded with ``seed``
    (``rng.normal(size=2)``, in a one-lane mapping when ``per_lane``), and the key after them."""
    key, draws = jax.random.PRNGKey(seed), []
    for _ in range(n):
        if per_lane:  # lane i of a mapping of n lanes has split(key, n)[i]; the state takes split(key, n + 1)[n]
            lane, key = jax.random.split(key, 1)[0], jax.random.split(key, 2)[1]
            draws.append(jax.random.normal(jax.random.split(lane)[1], (2,)))
        else:
            key, sub = jax.random.split(key)
            draws.append(jax.random.normal(sub, (2,)))
    return draws, key


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad"])
def test_threaded_calls_equal_a_sequential_order(transform):
    """Each call returns the counter it read and a draw: the counters are 0..99
    (no lost write) and the call that read k drew with the k-th key (no reused key)."""
    n = THREADS * CALLS
    counter = smap.LongTermState(jnp.zeros((), jnp.int32))
    rng = smap.random.RandomState(3)
    w = smap.ParamState(jnp.ones(()))

    def step(x):
        old = counter.value
        counter.value = old + 1
        return old, rng.normal(size=2) + x

    if transform == "jit":
        call = smap.jit(step)
    elif transform == "vmap":
        mapped = smap.vmap(step, in_axes=None, axis_size=1)
        call = lambda x: jax.tree_util.tree_map(lambda v: v[0], mapped(x))  # noqa: E731
    else:
        loss = lambda x: (lambda old, draw: (w.value * draw.sum(), (old, draw)))(*step(x))  # noqa: E731
        g = smap.grad(loss, grad_states=w, has_aux=True)
        call = lambda x: g(x)[1]  # noqa: E731

    results = run_in_threads(lambda: call(0.0))
    assert sorted(int(old) for old, _ in results) == list(range(n))
    assert int(counter.value) == n
    expected, last = reference_draws(3, n, per_lane=transform == "vmap")
    for old, draw in results:  # (to round-off: the draw is compiled into the call, the reference's is not)
        np.testing.assert_allclose(np.asarray(draw), np.asarray(expected[int(old)]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(rng.value), np.asarray(last))


def test_threaded_mapping_adding_to_a_long_term_state_loses_nothing():
    total = smap.LongTermState(jnp.zeros(()))
    rng = smap.random.RandomState(0)

    def f(x):
        total.value = total.value + jax.lax.psum(x, "i")
        return x + rng.uniform()

    add = smap.vmap(f, axis_name="i")
    xs = jnp.arange(4.0)
    outs = run_in_threads(lambda: add(xs))
    assert float(total.value) == THREADS * CALLS * 6.0

    # The same calls one after the other: the outputs are the same, in some order.
    total.value = jnp.zeros(())
    rng.seed(0)
    sequential = [add(xs) for _ in range(THREADS * CALLS)]
    assert float(total.value) == THREADS * CALLS * 6.0
    as_set = lambda results: sorted(tuple(np.asarray(r).tolist()) for r in results)  # noqa: E731
    assert as_set(outs) == as_set(sequential)
    assert len({tuple(np.asarray(r).tolist()) for r in outs}) == THREADS * CALLS  # no key reused


def test_module_level_samplers_from_threads_use_every_key_once():
    smap.random.seed(7)
    draws = run_in_threads(lambda: smap.random.normal(size=2))
    reference, last = reference_draws(7, THREADS * CALLS, per_lane=False)
    expected = sorted(tuple(np.asarray(d).tolist()) for d in reference)
    assert sorted(tuple(np.asarray(d).tolist()) for d in draws) == expected
    np.testing.assert_array_equal(np.asarray(smap.random.DEFAULT.value), np.asarray(last))


def test_calls_on_disjoint_states_do_not_wait_for_each_other():
    """While a call on ``a`` is inside its trace, a call on ``b`` completes; a call on ``a`` waits."""
    a, b = smap.State(jnp.zeros(())), smap.State(jnp.zeros(()))
    in_trace, b_done = threading.Event(), threading.Event()

    @smap.jit
    def add_a(x):
        if x.shape == (3,):  # the trace of a new signature, inside a call that holds a's lock
            in_trace.set()
            if not b_done.wait(timeout=30):
                raise TimeoutError("the call on b waited for the call on a")
        a.value = a.value + x.sum()
        return a.value

    @smap.jit
    def add_b(x):
        b.value = b.value + x.sum()
        return b.value

    add_a(jnp.ones(2))
    add_b(jnp.ones(2))  # both calls now know their states
    errors = []

    def call(f, x):
        try:
            f(x)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    first = threading.Thread(target=call, args=(add_a, jnp.ones(3)), daemon=True)
    first.start()
    assert in_trace.wait(timeout=60)
    same_state = threading.Thread(target=call, args=(add_a, jnp.ones(2)), daemon=True)
    same_state.start()
    add_b(jnp.ones(2))  # does not wait for the call on a
    same_state.join(timeout=0.2)
    assert same_state.is_alive()  # the second call on a waits for the first
    b_done.set()
    first.join(timeout=60)
    same_state.join(timeout=60)
    assert not first.is_alive() and not same_state.is_alive() and not errors, errors
    assert float(a.value) == 2.0 + 3.0 + 2.0
    assert float(b.value) == 4.0


def test_transforms_that_share_a_state_lose_no_write_to_each_other():
    """Two transforms write one state (and each its own): their calls from threads lose nothing,
    also while the second transform's first call joins the shared state's lock with its own."""
    shared, own_a, own_b = (smap.LongTermState(jnp.zeros(())) for _ in range(3))

    def add_a(x):
        shared.value = shared.value + x
        own_a.value = own_a.value + 1.0

    def add_b(x):
        shared.value = shared.value + 10 * x
        own_b.value = own_b.value + 1.0

    a, b = smap.jit(add_a), smap.jit(add_b)
    calls = iter(range(10**6))
    lock = threading.Lock()

    def call():
        with lock:
            i = next(calls)
        (a if i % 2 else b)(jnp.ones(()))

    run_in_threads(call)
    n = THREADS * CALLS
    assert float(own_a.value) == n // 2 and float(own_b.value) == n // 2
    assert float(shared.value) == (n // 2) * 1.0 + (n // 2) * 10.0


def test_a_host_callback_on_the_calling_thread_may_call_a_transform_of_the_same_lock_group():
    """The states' lock is reentrant: a callback run inside a call, on its thread, calls another
    transform whose state shares the caller's lock group, and runs inside the call."""
    total, log = smap.State(jnp.zeros(())), smap.State(jnp.zeros(()))
    record = smap.jit(lambda v: setattr(log, "value", log.value + v))

    @smap.jit
    def step(x):
        total.value = total.value + x + 0.0 * log.value  # reads log: one lock group for both states
        jax.debug.callback(record, total.value)
        return total.value

    outs = run_in_threads(lambda: float(step(jnp.ones(()))), threads=1, calls=3)
    assert step._state_list.group is record._state_list.group.current()
    assert outs == [1.0, 2.0, 3.0]
    assert float(total.value) == 3.0 and float(log.value) == 1.0 + 2.0 + 3.0


def _start(call, *args):
    """``call(*args)`` in a new thread; the thread and the list its error goes to."""
    errors = []

    def run():
        try:
            call(*args)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _wait_until(condition, what):
    for _ in range(6000):
        if condition():
            return
        time.sleep(0.01)
    raise TimeoutError(what)


def test_a_call_that_waited_for_the_token_may_be_re_entered_by_its_host_callback():
    """A second thread's call finds the token taken (the first call traces a new signature), waits,
    then runs; its callback calls a transform of the same lock group, which runs inside it."""
    total, log = smap.State(jnp.zeros(())), smap.State(jnp.zeros(()))
    record = smap.jit(lambda v: setattr(log, "value", log.value + v))
    entered, release = threading.Event(), threading.Event()

    @smap.jit
    def step(x):
        if x.shape == (3,):  # the trace of a new signature, inside a call that holds the token
            entered.set()
            if not release.wait(timeout=60):
                raise TimeoutError("not released")
        total.value = total.value + x.sum() + 0.0 * log.value
        jax.debug.callback(record, total.value)
        return total.value

    assert float(step(jnp.ones(2))) == 2.0
    first, first_errors = _start(step, jnp.ones(3))
    assert entered.wait(timeout=60)
    second, second_errors = _start(step, jnp.ones(2))
    group = step._state_list.group
    _wait_until(lambda: group.waiting == 1, "the second call did not wait for the token")
    release.set()
    for thread in (first, second):
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert not first_errors and not second_errors, first_errors + second_errors
    # In order: 2 (before), then 2 + 3 = 5 (the first thread's call), then 5 + 2 = 7 (the second's);
    # the callbacks add each call's total to log.
    assert float(total.value) == 7.0
    assert float(log.value) == 2.0 + 5.0 + 7.0


def test_calls_waiting_for_a_group_that_a_first_call_merges_lose_nothing():
    """While a call holds the token of a's group, a call on a waits for it and a new transform's first
    call, joining a with b, waits to merge a's group away; both go on once the token is given back."""
    a, b = smap.State(jnp.zeros(())), smap.State(jnp.zeros(()))
    entered, release = threading.Event(), threading.Event()

    @smap.jit
    def add_a(x):
        if x.shape == (3,):
            entered.set()
            if not release.wait(timeout=60):
                raise TimeoutError("not released")
        a.value = a.value + x.sum()

    @smap.jit
    def add_both(x):  # touches b first: the join keeps b's group and merges a's into it
        b.value = b.value + x.sum()
        a.value = a.value + 10 * x.sum()

    add_a(jnp.ones(2))
    group = add_a._state_list.group
    holder, holder_errors = _start(add_a, jnp.ones(3))
    assert entered.wait(timeout=60)
    waiter, waiter_errors = _start(add_a, jnp.ones(2))
    merger, merger_errors = _start(add_both, jnp.ones(2))
    _wait_until(lambda: group.waiting == 2, "the call and the merge did not both wait for the token")
    release.set()
    for thread in (holder, waiter, merger):
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert not holder_errors + waiter_errors + merger_errors, holder_errors + waiter_errors + merger_errors
    assert group.merged_into is not None
    assert add_a._state_list.group.current() is add_both._state_list.group.current()
    assert float(a.value) == 2.0 + 3.0 + 2.0 + 20.0
    assert float(b.value) == 2.0
    add_a(jnp.ones(2))  # after the merge, on the larger group
    assert float(a.value) == 29.0


def test_calls_racing_on_one_group_with_a_re_entering_callback_lose_nothing():
    """Many threads call two transforms of one lock group; one of them calls the other from a host
    callback. Every call's writes survive: the counts are those of the calls made."""
    calls, inner = smap.State(jnp.zeros(())), smap.State(jnp.zeros(()))
    bump = smap.jit(lambda: setattr(inner, "value", inner.value + 1.0))

    @smap.jit
    def outer(x):
        calls.value = calls.value + x + 0.0 * inner.value
        jax.debug.callback(bump)

    def call():
        outer(jnp.ones(()))
        bump()

    run_in_threads(call, threads=4, calls=20)
    assert float(calls.value) == 80.0
    assert float(inner.value) == 160.0


def test_a_call_left_behind_by_another_threads_list_is_written_out_again():
    """The interleaving that looped: a thread made a list with a new state the current one, and
    another thread's older call stayed the transform's call. A call that finds its state missing
    from that older list, while the current list has it, must write the call out again, not retry
    the older call for ever."""
    a, b = smap.ParamState(jnp.ones(())), smap.ParamState(2 * jnp.ones(()))

    def f(x):
        return x * a.value + (b.value if x.ndim else 0.0)

    call = smap.jit(f)
    call(jnp.ones(()))  # a list with a
    older = call.__call__
    call(jnp.ones(2))  # a list with a and b: the current one
    call.__call__ = older  # as a thread that wrote out the older list's call last would leave it
    np.testing.assert_allclose(call(jnp.ones(2)), [3.0, 3.0])
    np.testing.assert_allclose(call(jnp.ones(2)), [3.0, 3.0])


@pytest.mark.parametrize("transform", ["jit", "vmap"])
@pytest.mark.parametrize("attempt", range(2))  # a fresh transform each time: the lists grow again
def test_threads_that_find_new_states_at_once_lose_no_write(transform, attempt):
    """Each argument size reads and writes its own prefix of the counters, and each thread calls
    with the sizes in another order: the transform's state list grows while other threads call
    it. No call loops or fails, and every count is the number of calls that wrote it."""
    sizes = 6
    counters = [smap.State(jnp.zeros(())) for _ in range(sizes)]

    def bump(x):
        for c in counters[: x.shape[-1]]:
            c.value = c.value + 1.0
        return x.sum()

    call = smap.jit(bump) if transform == "jit" else smap.vmap(bump)  # (the counters are shared)
    orders = iter([[*range(t + 1, sizes + 1), *range(1, t + 1)] for t in range(THREADS)])
    lock = threading.Lock()

    def work():
        with lock:
            order = next(orders)
        return [call(jnp.ones((2, n) if transform == "vmap" else (n,))) for n in order * 2]

    run_in_threads(work, calls=1)
    assert [float(c.value) for c in counters] == [THREADS * 2 * (sizes - i) for i in range(sizes)]
