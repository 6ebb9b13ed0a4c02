"""benchmarks/floor.py's FLOP count and its product-shape floor agree on what the decoder computes."""

import pytest

from benchmarks.floor import forward_flops, products, shape_floor

DIMS = dict(E=8, U=16, A=4, V=30, L=9, C=12)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("attention", [True, False])
def test_the_listed_products_are_the_counted_flops(kind, attention):
    shapes = products(kind, attention, **DIMS)
    per_token = sum(2 * rows * k * m for _, per, rows, k, m in shapes if per != "caption")
    per_caption = sum(2 * rows * k * m for _, per, rows, k, m in shapes if per == "caption")
    assert (per_token, per_caption) == forward_flops(kind, attention, **DIMS)
    assert any(name == "context" for name, *_ in shapes) == attention


def test_the_shape_floor_times_every_kind_of_product():
    cost = shape_floor(products("gru", True, **DIMS), batch=4, tokens_per_caption=3.5, repeats=1)
    assert set(cost) == {"token", "caption"}
    assert all(0 < s < 0.1 for pair in cost.values() for s in pair)  # seconds per token or caption
