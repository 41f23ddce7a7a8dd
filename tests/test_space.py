"""Importance scores and the importance-ranked uniform sub-network."""

from __future__ import annotations

import optuna
import pytest
import torch

from slimlm.costs import static_cost
from slimlm.errors import SlimlmError
from slimlm.importance import Importance, activation_importance
from slimlm.models.base import LayerShape
from slimlm.space import NEURON_STEP, SearchSpace, keep_most_important, uniform_subnetwork

from .conftest import tiny_loaded
from .test_apply import masked_logits


def fixed_importance(dims) -> Importance:
    """Scores that make the expected choice obvious: higher index = more important."""
    heads = [torch.arange(s.heads, dtype=torch.float) for s in dims.layers]
    return Importance(
        heads=heads,
        kv_heads=[h.view(s.kv_heads, -1).sum(1) for h, s in zip(heads, dims.layers, strict=True)],
        neurons=[torch.arange(s.neurons, dtype=torch.float) for s in dims.layers],
        layers=torch.ones(dims.num_layers),
    )


def test_activation_importance_has_one_score_per_unit():
    loaded = tiny_loaded()
    scores = activation_importance(loaded, torch.randint(0, 96, (3, 16)))
    dims = loaded.dims
    assert [h.shape[0] for h in scores.heads] == [s.heads for s in dims.layers]
    assert [k.shape[0] for k in scores.kv_heads] == [s.kv_heads for s in dims.layers]
    assert [n.shape[0] for n in scores.neurons] == [s.neurons for s in dims.layers]
    assert scores.layers.shape == (dims.num_layers,)
    assert all(torch.isfinite(t).all() and (t >= 0).all() for t in [*scores.heads, *scores.neurons, scores.layers])


def test_activation_importance_ranks_by_what_changes_the_output():
    """Removing the lowest-scored neurons must hurt less than removing the highest-scored ones."""
    loaded = tiny_loaded()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    scores = activation_importance(loaded, ids)
    with torch.no_grad():
        dense = loaded.model(input_ids=ids).logits
    shapes = {i: LayerShape(s.heads, s.kv_heads, 20) for i, s in enumerate(loaded.dims.layers)}
    reversed_scores = Importance(scores.heads, scores.kv_heads, [-n for n in scores.neurons], scores.layers)
    errors = [
        (masked_logits(loaded, keep_most_important(loaded.dims, ranking, shapes), ids) - dense).pow(2).mean()
        for ranking in (scores, reversed_scores)
    ]
    assert errors[0] < errors[1]


def test_keep_most_important_respects_gqa_groups():
    dims = tiny_loaded().dims  # 2 kv groups of 3 heads
    subnet = keep_most_important(dims, fixed_importance(dims), {0: LayerShape(2, 1, 8)})
    keep = subnet.validate(dims).layers[0]
    assert keep.kv_heads == (1,)  # group 1 holds heads 3..5, the higher scores
    assert keep.heads == (4, 5)
    assert keep.neurons == tuple(range(32, 40))


@pytest.mark.parametrize("fraction", [0.95, 0.8, 0.6, 0.45])
def test_uniform_subnetwork_fits_the_budget(fraction):
    dims = tiny_loaded().dims
    subnet = uniform_subnetwork(dims, fixed_importance(dims), fraction).validate(dims)
    shapes = set(subnet.shapes())
    assert len(shapes) == 1 and len(subnet.layers) == dims.num_layers
    assert static_cost(dims, subnet.shapes()).params <= fraction * static_cost(dims).params
    assert next(iter(shapes)).neurons % NEURON_STEP == 0


def test_infeasible_budget_names_the_smallest_feasible_size():
    dims = tiny_loaded().dims
    smallest = static_cost(dims, [LayerShape(1, 1, NEURON_STEP)] * dims.num_layers).params
    with pytest.raises(SlimlmError, match=f"the smallest has {smallest:,}"):
        uniform_subnetwork(dims, fixed_importance(dims), 0.1)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_fraction_outside_zero_one_is_refused(fraction):
    dims = tiny_loaded().dims
    with pytest.raises(SlimlmError, match="fraction"):
        uniform_subnetwork(dims, fixed_importance(dims), fraction)


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5])
def test_search_start_is_as_large_as_the_budget_allows(fraction):
    """The evolution's starting point fills the budget: one more grid step of neurons everywhere would not fit."""
    dims = tiny_loaded().dims
    space = SearchSpace(depth=False)
    budget = int(fraction * static_cost(dims).params)
    starts = space.starts(dims, fixed_importance(dims), lambda shapes: static_cost(dims, shapes).params <= budget)
    start = starts[0].validate(dims)
    attention = [(s.shapes()[0].heads, s.shapes()[0].kv_heads) for s in starts]
    assert len(set(attention)) >= len(starts) - 1  # one per attention shape, and the adaptive start
    shape = start.shapes()[0]
    assert set(start.shapes()) == {shape} and len(start.layers) == dims.num_layers
    assert static_cost(dims, start.shapes()).params <= budget
    choices = space.neuron_choices(dims.layers[0])
    if shape.neurons < choices[-1]:
        bigger = LayerShape(shape.heads, shape.kv_heads, choices[choices.index(shape.neurons) + 1])
        assert static_cost(dims, [bigger] * dims.num_layers).params > budget


def test_depth_search_also_starts_from_whole_layers_removed_least_influential_first():
    dims = tiny_loaded().dims
    scores = fixed_importance(dims)
    scores = Importance(scores.heads, scores.kv_heads, scores.neurons, torch.tensor([4.0, 1.0, 3.0, 2.0]))
    budget = int(0.8 * static_cost(dims).params)
    fits = lambda shapes: static_cost(dims, shapes).params <= budget  # noqa: E731
    width = SearchSpace(depth=False).starts(dims, scores, fits)
    starts = SearchSpace(depth=True).starts(dims, scores, fits)
    assert [s.to_compact() for s in starts[:-1]] == [s.to_compact() for s in width]
    depth = starts[-1]
    assert all(keep.shape == dims.layers[i] for i, keep in depth.layers.items())  # whole layers
    removal_order = [1, 3, 2, 0]  # least influential first
    removed = removal_order[: dims.num_layers - len(depth.layers)]
    assert removed and depth.kept_layers == sorted(set(range(dims.num_layers)) - set(removed))
    assert fits(depth.shapes()) and not fits([dims.layers[i] for i in (*depth.layers, removed[-1])])


def test_adaptive_start_gives_layers_with_differently_spread_scores_different_widths():
    """FLAP's adaptive structure: one threshold on standardised scores, so a layer whose importance
    is spread differently (here skewed: a few standout units) keeps a different number of units."""
    dims = tiny_loaded().dims
    scores = fixed_importance(dims)
    skewed = torch.exp(torch.arange(dims.layers[1].neurons, dtype=torch.float) / 4)
    scores = Importance(scores.heads, scores.kv_heads, [scores.neurons[0], skewed, *scores.neurons[2:]], scores.layers)
    budget = int(0.7 * static_cost(dims).params)
    fits = lambda shapes: static_cost(dims, shapes).params <= budget  # noqa: E731
    space = SearchSpace()
    adaptive = [s for s in space.starts(dims, scores, fits) if len(set(s.shapes())) > 1]
    assert len(adaptive) == 1
    start = adaptive[0].validate(dims)
    assert fits(start.shapes()) and start.layers[1].shape.neurons != start.layers[0].shape.neurons
    assert all(s.neurons in space.neuron_choices(dims.layers[0]) for s in start.shapes())
    assert set(start.layers[1].neurons) == set(
        range(dims.layers[1].neurons - len(start.layers[1].neurons), dims.layers[1].neurons)
    )


def test_allocated_shapes_are_snapped_into_the_grid_shrunk_to_fit_and_go_first():
    """Another rule's per-layer shapes (FLAP's allocation) start the search: each layer keeps the
    rule's group count and the most grid neurons at or below the rule's, frozen layers stay whole."""
    dims = tiny_loaded().dims
    full = dims.layers[0]
    space = SearchSpace(frozen_layers=(3,))
    allocated = [LayerShape(full.heads, full.kv_heads, full.neurons - 3), LayerShape(full.group_size, 1, 37)] * 2
    budget = static_cost(dims).params
    fits = lambda shapes: static_cost(dims, shapes).params <= budget  # noqa: E731
    start = space.starts(dims, fixed_importance(dims), fits, allocated)[0].validate(dims)
    grid = space.neuron_choices(full)
    assert start.layers[0].shape == LayerShape(full.heads, full.kv_heads, max(n for n in grid if n <= full.neurons - 3))
    assert start.layers[1].shape == LayerShape(full.group_size, 1, max(n for n in grid if n <= 37))
    assert start.layers[3].shape == full
    tight = int(0.6 * static_cost(dims).params)
    fits = lambda shapes: static_cost(dims, shapes).params <= tight  # noqa: E731
    shrunk = space.starts(dims, fixed_importance(dims), fits, [full] * dims.num_layers)[0]
    assert fits(shrunk.shapes()) and shrunk.layers[3].shape == full


def test_search_start_keeps_frozen_layers_whole_and_uses_the_space_grid():
    dims = tiny_loaded().dims
    space = SearchSpace(frozen_layers=(0,), max_ratio=0.5)
    budget = int(0.8 * static_cost(dims).params)
    start = space.starts(dims, fixed_importance(dims), lambda shapes: static_cost(dims, shapes).params <= budget)[0]
    assert start.layers[0].shape == dims.layers[0]
    for i in (1, 2, 3):
        assert start.layers[i].shape.neurons in space.neuron_choices(dims.layers[i])
        assert start.layers[i].shape.neurons <= 0.5 * dims.layers[i].neurons


@pytest.mark.parametrize(
    ("space", "fraction"), [(SearchSpace(), 0.45), (SearchSpace(frozen_layers=(1,), min_ratio=0.25, step=0.1), 0.6)]
)
def test_shrink_to_fit_steps_random_shapes_into_the_budget_along_the_grid(space, fraction):
    dims = tiny_loaded().dims
    budget = int(fraction * static_cost(dims).params)

    def within(shapes):
        return static_cost(dims, shapes).params <= budget

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        shapes = {}
        for i, full in enumerate(dims.layers):
            attention = space.attention_choices(full)
            a = attention[int(torch.randint(len(attention), (1,), generator=generator))]
            neurons = space.neuron_choices(full)
            shapes[i] = full if i in space.frozen_layers else LayerShape(a.heads, a.kv_heads, neurons[-1])
        fitted = space.shrink_to_fit(dims, shapes, within)
        assert within(list(fitted.values()))
        for i, shape in fitted.items():
            full = dims.layers[i]
            if i in space.frozen_layers:
                assert shape == full
                continue
            assert shape.neurons in space.neuron_choices(full) and shape.neurons <= shapes[i].neurons
            assert (shape.heads, shape.kv_heads) in [(a.heads, a.kv_heads) for a in space.attention_choices(full)]
            assert shape.heads <= shapes[i].heads
        assert fitted != shapes


def test_shrink_to_fit_leaves_fitting_shapes_alone_and_stops_at_the_smallest():
    dims = tiny_loaded().dims
    space = SearchSpace(depth=False)
    full = dict(enumerate(dims.layers))
    assert space.shrink_to_fit(dims, full, lambda shapes: True) == full
    assert space.shrink_to_fit(dims, full, lambda shapes: False) == space.smallest(dims)


@pytest.mark.parametrize("space", [SearchSpace(), SearchSpace(per_layer=False), SearchSpace(depth=True)])
def test_params_of_gives_back_the_shapes_through_suggest(space):
    dims = tiny_loaded().dims
    budget = int(0.6 * static_cost(dims).params)
    start = space.starts(dims, fixed_importance(dims), lambda shapes: static_cost(dims, shapes).params <= budget)[0]
    shapes = {i: start.layers[i].shape for i in start.kept_layers}
    if space.depth:
        shapes.pop(2)
    trial = optuna.trial.FixedTrial(space.params_of(dims, shapes))
    assert space.suggest(trial, dims) == shapes


def test_params_of_refuses_shapes_off_the_grid():
    dims = tiny_loaded().dims
    shapes = {0: LayerShape(dims.layers[0].heads, dims.layers[0].kv_heads, NEURON_STEP + 1)}
    with pytest.raises(SlimlmError, match="not a choice of this search space"):
        SearchSpace().params_of(dims, shapes)
