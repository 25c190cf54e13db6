"""Canary: every JAX internal that smap and sharding rely on, checked by name against the installed JAX.

All such knowledge lives in ``smap/_compat.py``: private imports, the table of
primitives smap interprets (``PRIMITIVES``) and the layouts of their
equations' parameters. A JAX release that renames a primitive, moves a
private function or changes an equation's parameters fails here, in the test
named after it. Tests below also keep this list honest: the private imports
of ``smap/_compat.py`` and the entries of its table must all appear here, and
no other module of smap or sharding may touch JAX internals.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from smap import _compat
from smap._compat import Kind

ROOT = pathlib.Path(__file__).resolve().parents[2]

# -- private imports and public APIs whose exact form smap depends on --------------------

PRIVATE = {
    "jax._src.source_info_util.current": "the source location given to a new jaxpr input",
    "jax._src.array.ArrayImpl": "the concrete type of jax.Array",
    "jax._src.sharding.IndivisibleError": "JAX refusing an input on a mesh of another shape than the program's",
    "jax._src.mesh.get_concrete_mesh": "the mesh jax.set_mesh set, readable inside a trace",
    "jax._src.xla_bridge.backends_are_initialized": "whether the device count is already fixed",
    "jax.extend.core.take_current_trace": "the trace building the current jaxpr",
    "jax._src.core.set_current_trace": "making a state's Refs in its own trace while a nested jaxpr is built",
    "jax._src.state.discharge.discharge_state": "a program's Refs replaced by the values they hold",
    "jax._src.core.extend_axis_env_nd": "the mapped axis bound while a program's Refs are discharged",
    "jax.extend.core.jaxprs_in_params": "the programs nested in an equation (jax._src.core before JAX 0.10)",
    "jax.sharding.use_abstract_mesh": "tracing per-lane programs without the ambient mesh",
    "jax.sharding.AbstractMesh": "the empty abstract mesh",
    "jax.sharding.AxisType": "Explicit and Auto mesh axes",
    "jax.sharding.get_abstract_mesh": "the ambient mesh's axis types inside a trace",
    "jax.sharding.reshard": "moving values onto a mesh of Explicit axes inside the program",
    "jax.sharding.auto_axes": "running jax.pmap outside a mesh of Explicit axes",
    "jax.typeof": "the mesh a traced value is typed on",
    "jax.shard_map": "the SPMD map behind sharding.shard_map",
    "jax.smap": "the single-axis shard_map accepted as a mapping_fn",
}


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    if dotted == "jax.extend.core.jaxprs_in_params" and jax.__version_info__ < (0, 10):
        module = "jax._src.core"
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", sorted(PRIVATE))
def test_name_exists(name):
    assert _resolve(name) is not None, f"{name} ({PRIVATE[name]}) is gone"


def test_new_arg_adds_an_input_mid_trace():
    """The trace's ``new_arg`` (through ``_compat.new_input``) appends an input to the jaxpr."""

    def f(x):
        extra = _compat.new_input(_compat.current_trace(), jax.core.ShapedArray((2,), jnp.float32))
        return x + extra

    jaxpr = jax.make_jaxpr(f)(jnp.ones(2)).jaxpr
    assert [(v.aval.shape, v.aval.dtype) for v in jaxpr.invars] == [((2,), jnp.float32)] * 2
    assert jax.core.eval_jaxpr(jaxpr, [], jnp.ones(2), jnp.full(2, 2.0))[0].tolist() == [3.0, 3.0]


def test_refs_made_in_the_outer_trace_carry_a_scans_writes_out_and_discharge_to_a_pure_program():
    """``_compat.new_refs`` in the trace of a state's input, written inside a scan (``_compat.write_refs``),
    read after it, and ``_compat.discharge_refs``: a program without Refs giving the same values."""

    def f(x, total):
        trace = _compat.current_trace()
        refs = {}

        def body(c, _):
            if not refs:  # first touched inside the scan: made where the input is
                refs["total"] = _compat.new_refs(trace, total)
            _compat.write_refs(refs["total"], _compat.read_refs(refs["total"]) + c)
            return c * 2, None

        out, _ = jax.lax.scan(body, x, None, length=3)
        return out, _compat.read_refs(refs["total"])

    closed = _compat.discharge_refs(jax.make_jaxpr(f)(jnp.ones(2), jnp.zeros(2)), ())
    assert not closed.jaxpr.effects
    out, total = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, jnp.ones(2), jnp.zeros(2))
    assert out.tolist() == [8.0, 8.0] and total.tolist() == [7.0, 7.0]


def test_jax_refuses_a_per_example_write_into_an_outer_ref_in_words_smap_recognises():
    def f(x):
        ref = jax.new_ref(jnp.zeros(()))
        jax.vmap(lambda v: ref.__setitem__(..., v))(x)
        return ref[...]

    with pytest.raises(Exception) as refused:
        jax.make_jaxpr(f)(jnp.ones(3))
    assert _compat.refuses_ref_write(refused.value), str(refused.value)


def test_sub_jaxpr_keeps_some_equations_without_a_debug_info_warning():
    """``_compat.sub_jaxpr`` (the lane-invariant tail's cut) builds a jaxpr from another's equations."""
    import warnings

    jaxpr = jax.make_jaxpr(lambda x: (x * 2) + 1)(1.0).jaxpr
    doubled = jaxpr.eqns[0].outvars[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = _compat.sub_jaxpr(jaxpr, jaxpr.invars, [doubled], jaxpr.eqns[:1])
        tail = _compat.sub_jaxpr(jaxpr, [doubled], jaxpr.outvars, jaxpr.eqns[1:])
    assert jax.core.eval_jaxpr(head, [], 3.0)[0] == 6.0
    assert jax.core.eval_jaxpr(tail, [], 6.0)[0] == 7.0


def test_shard_map_takes_check_vma():
    assert "check_vma" in inspect.signature(jax.shard_map).parameters


def test_smap_takes_axis_name():
    assert {"in_axes", "out_axes", "axis_name"} <= set(inspect.signature(jax.smap).parameters)


def test_auto_mesh_axes():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)


def test_ambient_mesh_is_read_inside_a_trace():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    seen = []
    with jax.set_mesh(mesh):
        jax.make_jaxpr(lambda x: seen.append(_compat.ambient_mesh()) or x)(1.0)
    assert seen == [mesh]
    assert _compat.ambient_mesh() is None


# -- the primitives smap interprets: one witness program each ----------------------------


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _compat.jaxprs_in_params(eqn.params):
            yield from _eqns(_compat.open_jaxpr(sub))


def _traced(f, *args, axis_env=None):
    return jax.make_jaxpr(f, axis_env=axis_env)(*args).jaxpr


def _with_axis(f):
    return lambda: _traced(f, jnp.ones((2, 3)), axis_env=[("i", 4)])


def _invariant_psum():
    mesh = jax.make_mesh((1,), ("i",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    body = jax.shard_map(lambda x: jax.lax.psum(x, "i"), mesh=mesh, in_specs=jax.P("i"), out_specs=jax.P())
    return _traced(body, jnp.ones(2))


def _custom_jvp():
    f = jax.custom_jvp(lambda x: jnp.sin(x))
    f.defjvp(lambda primals, tangents: (f(*primals), tangents[0]))
    return _traced(f, 1.0)


def _custom_vjp():
    f = jax.custom_vjp(lambda x: jnp.sin(x))
    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g,))
    return _traced(f, 1.0)


def _scan():
    # 2 constants (a, b), 3 carries, 1 scanned input, 2 outputs per step
    def f(a, b, xs):
        def body(carry, x):
            c, d, e = carry
            return (c + a * x, d * b, e + 1), (c, d)

        return jax.lax.scan(body, (0.0, 1.0, 2), xs)

    return _traced(f, jnp.float32(2.0), jnp.float32(3.0), jnp.ones(5))


def _while():
    # 1 constant in the condition, 2 in the body, 2 carries
    def f(limit, a, b):
        return jax.lax.while_loop(lambda c: c[0] < limit, lambda c: (c[0] + a, c[1] * b), (0.0, 1.0))

    return _traced(f, 3.0, 1.0, 2.0)


def _discharged_scan():
    # a Ref written inside a scan, discharged as smap discharges a state written there
    def f(x):
        ref = jax.new_ref(x)
        jax.lax.scan(lambda c, _: (ref.__setitem__(..., ref[...] + c), (c, None))[1], x, None, length=2)
        return ref[...]

    return _compat.open_jaxpr(_compat.discharge_refs(jax.make_jaxpr(f)(1.0), ()))


WITNESSES = {
    "psum": _with_axis(lambda x: jax.lax.psum(x, "i")),
    "pmax": _with_axis(lambda x: jax.lax.pmax(x, "i")),
    "pmin": _with_axis(lambda x: jax.lax.pmin(x, "i")),
    "psum_invariant": _invariant_psum,
    "all_gather": _with_axis(lambda x: jax.lax.all_gather(x, "i", axis=1, tiled=True)),
    "reduce_scatter": _with_axis(
        lambda x: jax.lax.psum_scatter(jnp.ones((2, 8)), "i", scatter_dimension=1, tiled=True)
    ),
    "axis_index": _with_axis(lambda x: x * jax.lax.axis_index("i")),
    "jit": lambda: _traced(jax.jit(lambda x: x * 2), 1.0),
    "remat2": lambda: _traced(jax.checkpoint(lambda x: jnp.sin(x) * 2), 1.0),
    "custom_jvp_call": _custom_jvp,
    "custom_vjp_call": _custom_vjp,
    ("eval_jaxpr" if jax.__version_info__ >= (0, 11) else "closed_call"): _discharged_scan,
    "scan": _scan,
    "while": _while,
    "cond": lambda: _traced(lambda p, x: jax.lax.cond(p, jnp.sin, jnp.cos, x), True, 1.0),
}


def test_every_primitive_in_the_table_has_a_witness():
    assert set(WITNESSES) == set(_compat.PRIMITIVES)


def _witnessed(name):
    eqns = [e for e in _eqns(WITNESSES[name]()) if e.primitive.name == name]
    assert eqns, f"no {name!r} equation in its witness program: JAX renamed or replaced the primitive"
    assert _compat.kind(eqns[0]) is _compat.PRIMITIVES[name]
    return eqns[0]


@pytest.mark.parametrize("name", sorted(_compat.PRIMITIVES))
def test_primitive(name):
    """The primitive is still called ``name`` and its parameters have the layout smap reads."""
    eqn = _witnessed(name)
    kind = _compat.PRIMITIVES[name]
    if kind in (Kind.REDUCTION, Kind.GATHER, Kind.INDEX):
        assert _compat.collective_axes(eqn)[1] == ("i",)
        assert _compat.names_axis(eqn, "i") and not _compat.names_axis(eqn, "j")
        if kind is Kind.REDUCTION:
            # rebound over another axis, it reduces over that axis
            lanes = jnp.arange(6.0).reshape(2, 3)
            out = jax.vmap(lambda v: _compat.rebind_on_axes(eqn, [v], ("j",))[0], axis_name="j")(lanes)
            reduce = {"pmax": jnp.max, "pmin": jnp.min}.get(name, jnp.sum)
            assert jnp.array_equal(out, jnp.broadcast_to(reduce(lanes, axis=0), (2, 3)))
    if kind is Kind.GATHER:
        assert _compat.gather_layout(eqn) == (1, True)
    if kind is Kind.SCATTER:
        assert _compat.collective_axes(eqn)[1] == ("i",)
        assert _compat.scatter_layout(eqn) == (1, True)
    if kind is Kind.CALL:
        body = _compat.open_jaxpr(_compat.call_body(eqn))
        assert len(body.invars) == len(eqn.invars) and len(body.outvars) == len(eqn.outvars)
    if kind is Kind.SCAN:
        body, n_consts, n_carry = _compat.scan_parts(eqn)
        assert (n_consts, n_carry) == (2, 3)
        assert len(_compat.open_jaxpr(body).invars) == len(eqn.invars) == 6
        options = _compat.scan_options(eqn)
        assert set(options) == {"length", "reverse", "unroll"} and (options["length"], options["reverse"]) == (5, False)
    if kind is Kind.WHILE:
        cond, body, n_cond, n_body = _compat.while_parts(eqn)
        assert (n_cond, n_body) == (1, 2)
        assert len(_compat.open_jaxpr(cond).invars) == 3 and len(_compat.open_jaxpr(body).invars) == 4
    if kind is Kind.COND:
        branches = _compat.cond_branches(eqn)
        assert len(branches) == 2
        assert all(len(_compat.open_jaxpr(b).invars) == len(eqn.invars) - 1 for b in branches)


def test_bind_equation_runs_the_equation():
    """A scan equation bound to new inputs loops over them as jax.lax.scan does (values by hand)."""
    eqn = _witnessed("scan")
    a, b, xs = 2.0, 3.0, jnp.arange(5.0)
    outs = _compat.bind_equation(eqn, [a, b, 0.0, 1.0, 2, xs])
    carry, ys = outs[:3], outs[3:]
    assert [float(c) for c in carry] == [a * float(xs.sum()), b**5, 7]
    assert ys[0].tolist() == (a * jnp.cumsum(xs) - a * xs).tolist() and ys[1].tolist() == [b**i for i in range(5)]


# -- the list is complete, and nothing else touches JAX internals -------------------------

_COMPAT = ROOT / "smap" / "_compat.py"


def test_every_private_import_of_the_module_is_checked_here():
    """Each name imported from jax._src or jax.extend (or used from a jax._src module) is in PRIVATE."""
    source = _COMPAT.read_text()
    wanted = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("jax._src", "jax.extend")):
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if inspect.ismodule(getattr(importlib.import_module(node.module), alias.name, None)):
                    used = re.findall(rf"\b{alias.asname or alias.name}\.(\w+)", source)
                    wanted |= {f"{dotted}.{attr}" for attr in used}
                elif node.module != "jax.extend.core" or alias.name not in ("Jaxpr", "ClosedJaxpr"):
                    wanted.add(dotted)
    wanted.discard("jax._src.core.jaxprs_in_params")  # the JAX 0.9 fallback of the public name
    assert wanted and wanted <= set(PRIVATE), sorted(wanted - set(PRIVATE))


@pytest.mark.parametrize("package", ["smap", "sharding"])
def test_no_other_module_touches_jax_internals(package):
    """Private imports, equation parameters and primitive names appear only in smap/_compat.py."""
    names = "|".join(map(re.escape, _compat.PRIMITIVES))
    internal = re.compile(rf"jax\._src|\.params\[|\.params\.get\(|primitive\.name\s*(==|in\b)|[\"']({names})[\"']")
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path == _COMPAT:
            continue
        text = re.sub(r"__all__\s*=\s*\[[^\]]*\]", "", path.read_text())
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in internal.finditer(text)]
    assert offenders == []


FUSED_NAMES = sorted(
    _compat.LINEAR_PRIMITIVES
    | _compat.SUM_PRIMITIVES
    | {_compat.DOT_GENERAL, _compat.MUL, _compat.DIV, _compat.CONVERT}
)


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_primitive_that_the_lane_sum_fusion_reads_exists(name):
    """Each primitive name smap.transform._fuse recognises is a primitive of the installed JAX."""
    from jax.extend.core import primitives

    names = {p.name for p in vars(primitives).values() if hasattr(p, "bind") and hasattr(p, "name")}
    assert name in names, f"JAX has no primitive named {name!r}: the lane-sum fusion would never see it"


# -- jax.Ref: its buffer, and the methods smap routes inside its traces --------------------


@pytest.mark.skipif(not _compat.HAS_REFS, reason="this JAX has no jax.Ref")
def test_ref_buffer_is_read_and_replaced():
    ref = jax.new_ref(jnp.zeros(2))
    assert _compat.is_ref(ref) and not _compat.is_ref(jnp.zeros(2))
    assert _compat.ref_value(ref).tolist() == [0.0, 0.0]
    _compat.set_ref_value(ref, jnp.ones(2))
    assert ref[...].tolist() == [1.0, 1.0]
    assert {"__getitem__", "__setitem__", "addupdate"} <= set(vars(_compat.RefType))
    assert _compat.ref_constants(jax.make_jaxpr(lambda: jax.ref.get(ref, ()))()) == [ref]


# -- what lane norms read (smap.transform._lane_norms) ---------------------------------------


def _jaxpr_eqns(f, *args):
    """The equations of ``f``'s jaxpr, those of the programs it calls included."""

    def walk(jaxpr):
        for e in jaxpr.eqns:
            yield e
            for sub in _compat.jaxprs_in_params(e.params):
                yield from walk(_compat.open_jaxpr(sub))

    return list(walk(jax.make_jaxpr(f)(*args).jaxpr))


@pytest.mark.parametrize("square", [lambda g: g**2, jnp.square, lambda g: g * g], ids=["integer_pow", "square", "mul"])
def test_a_square_and_a_sum_over_every_axis_are_recognised(square):
    eqns = _jaxpr_eqns(lambda g: jnp.sum(square(g)), jnp.ones((2, 3)))
    assert [_compat.squares(e) for e in eqns] == [True, False]
    assert _compat.primitive_name(eqns[1]) == _compat.REDUCE_SUM and _compat.sums_every_axis(eqns[1])
    assert not _compat.sums_every_axis(_jaxpr_eqns(lambda g: jnp.sum(g, 0), jnp.ones((2, 3)))[0])
    assert not any(_compat.squares(e) for e in _jaxpr_eqns(lambda g: g**3 * g, jnp.ones(3)))


def test_entry_keeping_steps_and_added_zeros_are_recognised():
    names = {
        _compat.primitive_name(e) for e in _jaxpr_eqns(lambda g: -g.T.reshape(6)[None].squeeze(0), jnp.ones((2, 3)))
    }
    assert names - {"broadcast_in_dim"} <= _compat.ENTRY_KEEPING and _compat.RESHAPE in names
    (expand,) = [e for e in _jaxpr_eqns(lambda g: g[None], jnp.ones(3))]
    (pad,) = _jaxpr_eqns(lambda g: jax.lax.pad(g, 0.0, [(1, 2, 0)]), jnp.ones(3))
    (crop,) = _jaxpr_eqns(lambda g: jax.lax.pad(g, 0.0, [(-1, 0, 0)]), jnp.ones(3))
    (tile,) = _jaxpr_eqns(lambda g: jnp.broadcast_to(g, (2, 3)), jnp.ones(3))
    assert _compat.adds_entries(expand) and _compat.adds_entries(pad)
    assert not _compat.adds_entries(crop) and not _compat.adds_entries(tile)
    (add,) = _jaxpr_eqns(lambda a, b: a + b, jnp.ones(3), jnp.ones(3))
    assert _compat.primitive_name(add) in _compat.ADDS


@pytest.mark.parametrize("mode", ["index", "clip", "fill"])
def test_an_embedding_gradient_is_a_row_scatter_add(mode):
    gather = {
        "index": lambda t, i: t[i],
        "clip": lambda t, i: jnp.take(t, i, axis=0, mode="clip"),
        "fill": lambda t, i: t.at[i].get(mode="fill", fill_value=0.0),
    }[mode]
    eqns = _jaxpr_eqns(jax.grad(lambda t, i: jnp.sum(gather(t, i))), jnp.ones((5, 2)), jnp.array([[0, 4], [1, 1]]))
    (scatter,) = [e for e in eqns if _compat.primitive_name(e) == _compat.SCATTER_ADD]
    assert _compat.embedding_scatter(scatter) == ("clip" if mode == "clip" else "drop")
    (columns,) = [
        e
        for e in _jaxpr_eqns(jax.grad(lambda t: jnp.sum(t[:, jnp.array([0, 1])])), jnp.ones((5, 2)))
        if _compat.primitive_name(e) == _compat.SCATTER_ADD
    ]
    assert _compat.embedding_scatter(columns) is None
