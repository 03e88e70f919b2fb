"""Lazy graphs: layers whose tasks are made on demand, and culling that keeps them so.

The engine's stages have one task per block of a regular grid of blocks; a
:class:`BlockLayer` makes the task of a block only when it is asked for, so
the graph of a petabyte's pipeline is built at once and holds no tasks.
:func:`cull` takes the part of a graph that some keys need, layer by layer
from the last, asking each layer for the tasks of the keys wanted: lazy
layers (ours, dask's blockwise ones) make only those, and no layer is asked
for all its keys, so computing one block of a huge result, or one batch of
it, costs what that part needs. :func:`gathered` then folds into each
output block's task the tasks only that block needs, so that a block is
made in one place.
"""

from __future__ import annotations

import collections
import graphlib
import itertools
import math

from dask._task_spec import Task, convert_legacy_graph
from dask.blockwise import Blockwise
from dask.highlevelgraph import HighLevelGraph, Layer, MaterializedLayer

__all__ = ["BlockLayer", "batches", "cull", "edges_of", "gathered", "spans"]

_PROBE = 64  # items whose graph gives the tasks an item needs (see batches)


def edges_of(chunks):
    """Where the blocks of `chunks` start and stop, per axis.

    Examples
    --------
    >>> edges_of(((2, 3), (4,)))
    [[0, 2, 5], [0, 4]]
    """
    return [list(itertools.accumulate(c, initial=0)) for c in chunks]


def spans(edges, index):
    """Where the block `index` starts and stops along each axis of `edges`
    (:func:`edges_of`); indices beyond its axes are ignored.

    Examples
    --------
    >>> spans([[0, 2, 5], [0, 4]], (1, 0, 7))
    [(2, 5), (0, 4)]
    """
    return [(e[i], e[i + 1]) for e, i in zip(edges, index, strict=False)]


class BlockLayer(Layer):
    """Tasks on a grid of blocks, each made only when it is asked for.

    A dask layer whose tasks are generated on demand: ``layer[key]`` makes
    the task of one block, and :meth:`cull` makes only those of the blocks
    wanted (with the `shared` tasks they read, such as the source and its
    chunk cache, and those asked for by other layers), so a graph over a
    petabyte is built in no time and
    computing a part of it generates only that part's tasks. Tasks are
    dask's :class:`~dask._task_spec.Task` objects, whose dependencies are
    known without a scan of the whole graph.

    Parameters
    ----------
    name : str
        The name of the block keys ``(name, *index)``.
    numblocks : tuple of int
        Blocks per axis.
    make : callable
        ``make(key, index)``: the task of one block.
    shared : dict or None
        ``{key: GraphNode}`` of tasks that blocks read.

    Attributes
    ----------
    notes : dict
        What the library's stages note on their layers to build further
        graphs with (:func:`note`): arrays, whose graphs hold the layer
        again, and block makers. Not sent with a graph.
    """

    has_legacy_tasks = False

    def __init__(self, name, numblocks, make, shared=None):
        super().__init__()
        self.name, self.numblocks, self.make = name, tuple(numblocks), make
        self.shared = dict(shared or {})
        self.notes = {}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "notes"}

    def __setstate__(self, state):
        self.__dict__.update(state, notes={})

    def _index(self, key):
        if (
            isinstance(key, tuple)
            and len(key) == len(self.numblocks) + 1
            and key[0] == self.name
            and all(
                isinstance(i, int) and 0 <= i < n
                for i, n in zip(key[1:], self.numblocks, strict=True)
            )
        ):
            return key[1:]
        return None

    def __getitem__(self, key):
        if key in self.shared:
            return self.shared[key]
        index = self._index(key)
        if index is None:
            raise KeyError(key)
        return self.make(key, index)

    def __iter__(self):
        yield from self.shared
        for index in itertools.product(*map(range, self.numblocks)):
            yield (self.name, *index)

    def __len__(self):
        return len(self.shared) + math.prod(self.numblocks)

    def is_materialized(self):
        return False

    def get_output_keys(self):
        return set(self)

    def substituted(self, substitute):
        """A copy whose task for a block is ``substitute(task, index)``."""

        def make(key, index):
            return substitute(self.make(key, index), index)

        return BlockLayer(self.name, self.numblocks, make, self.shared)

    def cull(self, keys, all_hlg_keys):
        tasks = {}
        for key in keys:
            index = self._index(key)
            if index is not None:
                tasks[key] = self.make(key, index)
            elif key in self.shared:  # read by another layer too
                tasks[key] = self.shared[key]
        for node in list(tasks.values()):
            for dep in node.dependencies:
                if dep in self.shared:
                    tasks[dep] = self.shared[dep]
        deps = {key: set(node.dependencies) for key, node in tasks.items()}
        return MaterializedLayer(tasks, annotations=self.annotations), deps


def batches(items, make, tasks, batch_size, whole=1):
    """``make(batch)`` for runs of consecutive `items`, each of bounded size.

    Each run's graph holds at most `batch_size` tasks (``tasks(made)``),
    unless one item alone needs more; all items make one run if
    `batch_size` is None. The tasks an item needs are estimated from the
    first :data:`_PROBE` items (whose graph is the one run where they are
    all the items and it fits); a run is a multiple of `whole` items when
    that many fit (whole slabs of chunks, say), and a run found larger than
    estimated is halved. Each is made only when the one before has been
    used, so what a batch stores the next can read.

    Examples
    --------
    >>> runs = batches(range(7), list, lambda run: 2 * len(run), batch_size=5)
    >>> list(runs)
    [[0, 1], [2, 3], [4, 5], [6]]
    """
    items = iter(items)
    probe = list(itertools.islice(items, _PROBE))
    if not probe:
        return
    size = math.inf
    if batch_size is not None:
        made, following = make(probe), list(itertools.islice(items, 1))
        if not following and tasks(made) <= batch_size:
            yield made  # the probe holds every item: its graph is the one batch
            return
        items = itertools.chain(following, items)
        size = max(1, int(batch_size * len(probe) / max(tasks(made), 1)))
        size = size // whole * whole if size >= whole else size
    items = itertools.chain(probe, items)
    while batch := list(itertools.islice(items, size if size < math.inf else None)):
        made = make(batch)
        while batch_size is not None and tasks(made) > batch_size and len(batch) > 1:
            items = itertools.chain(batch[len(batch) // 2 :], items)
            batch = batch[: len(batch) // 2]
            made = make(batch)
        yield made


def note(layer, name):
    """What a stage noted as `name` on `layer` (a BlockLayer), or None."""
    return getattr(layer, "notes", {}).get(name)


class _Keys:
    """The keys of a graph's layers, tested without listing them.

    A tuple key ``(name, ...)`` is taken to exist when a layer is named
    `name` (dask's array keys); another key, when a materialized layer
    holds it. This is what culling a layer of old-style tasks asks.
    """

    def __init__(self, graph):
        self.names = set(graph.layers)
        self.materialized = [
            layer for layer in graph.layers.values() if layer.is_materialized()
        ]

    def __contains__(self, key):
        if isinstance(key, tuple):
            return bool(key) and key[0] in self.names
        return any(key in layer for layer in self.materialized)

    def within(self, layer):
        """These keys and those `layer` holds under other names, for culling it.

        (dask's overlap layer holds the slices of its neighbours' blocks,
        ``getitem-...`` keys, beside its own ``overlap-...`` ones.)
        """
        if isinstance(layer, BlockLayer | Blockwise):  # asking would build them
            return self
        return _Within(self, layer)


class _Within:
    def __init__(self, keys, layer):
        self.keys, self.layer = keys, layer

    def __contains__(self, key):
        return key in self.keys or key in self.layer


def _listed(layer):
    return isinstance(layer, MaterializedLayer) and isinstance(layer.mapping, dict)


def cull(graph, keys):
    """The part of `graph` (a HighLevelGraph) that computes `keys`.

    Unlike ``HighLevelGraph.cull``, it keeps the layers' names and their
    dependencies, and never lists all the keys of the graph.
    """
    keys = set(keys)
    known = _Keys(graph)
    order = graphlib.TopologicalSorter(graph.dependencies).static_order()
    layers = {}
    for name in reversed(list(order)):
        layer = graph.layers[name]
        # a materialized layer given as many keys as it holds keeps them all
        wanted = {k for k in keys if k in layer.mapping} if _listed(layer) else keys
        culled, deps = layer.cull(wanted, known.within(layer))
        if not deps:
            continue
        layers[name] = culled
        keys.update(*deps.values())
        keys.difference_update(deps)
    dependencies = {name: _kept(graph.dependencies, name, layers) for name in layers}
    return HighLevelGraph(layers, dependencies)


def _kept(dependencies, name, kept):
    """The layers among `kept` that layer `name` depends on, directly or
    through layers left out (a task may read a block of a layer its own
    layer's dependencies depend on)."""
    found, seen, stack = set(), set(), list(dependencies[name])
    while stack:
        layer = stack.pop()
        if layer in seen:
            continue
        seen.add(layer)
        if layer in kept:
            found.add(layer)
        else:
            stack.extend(dependencies[layer])
    return found


def gathered(graph, keys, keep):
    """`graph` (a HighLevelGraph) with each of `keys` made by one task that
    also runs the tasks only it needs.

    A task whose dependents are all among those gathered for one key joins
    that key's task (dask's :meth:`~dask._task_spec.Task.fuse`: it runs them
    in order and lets each value go when the last task needing it is done),
    unless ``keep(key)``; a task several keys need, and each of `keys`,
    stays a task of its own. An output block is then made in one place: on
    a cluster, its intermediate chunks never travel between workers. The
    graph is listed whole, so it must be of bounded size (a batch's).
    Returns a graph of one layer, named as `keys` are; `graph` itself where
    no task joins another, or where a layer carries annotations, which one
    layer could not keep.

    Examples
    --------
    >>> from dask._task_spec import Task, TaskRef
    >>> tasks = {
    ...     "a": Task("a", int, "1"),
    ...     "b": Task("b", pow, TaskRef("a"), 2),
    ...     "shared": Task("shared", int, "2"),
    ...     ("out", 0): Task(("out", 0), max, TaskRef("b"), TaskRef("shared")),
    ...     ("out", 1): Task(("out", 1), min, TaskRef("shared"), 5),
    ... }
    >>> graph = HighLevelGraph.from_collections("out", tasks)
    >>> made = gathered(graph, [("out", 0), ("out", 1)], keep=lambda key: False)
    >>> sorted(map(str, made))  # "a" and "b" run inside ("out", 0)'s task
    ["('out', 0)", "('out', 1)", 'shared']
    >>> dict(made)[("out", 0)]({"shared": 2})
    2
    """
    if any(layer.annotations for layer in graph.layers.values()):
        return graph
    tasks = convert_legacy_graph(dict(graph))
    dependents = collections.defaultdict(set)
    for key, node in tasks.items():
        for dependency in node.dependencies:
            dependents[dependency].add(key)
    out, wanted = dict(tasks), set(keys)
    for key in keys:
        inside = _exclusive(key, tasks, dependents, lambda k: k in wanted or keep(k))
        if len(inside) > 1:
            for k in inside:
                del out[k]
            out[key] = Task.fuse(*(tasks[k] for k in inside), key=key)
    if len(out) == len(tasks):
        return graph
    name = next(iter(keys))[0]
    return HighLevelGraph.from_collections(name, out)


def _exclusive(key, tasks, dependents, keep):
    """`key` and the tasks of `tasks` that only it needs, directly or not."""
    inside, candidates = {key}, set(tasks[key].dependencies)
    while True:
        joining = {
            k
            for k in candidates - inside
            if k in tasks
            and not keep(k)
            and not tasks[k].block_fusion
            and dependents[k] <= inside
        }
        if not joining:
            return inside
        inside |= joining
        for k in joining:
            candidates |= tasks[k].dependencies
