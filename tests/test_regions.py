"""The R-MAC region grid against hand-derived expectations."""

import numpy as np
import pytest

from remap_tf.regions import num_regions, relative_regions, rmac_regions, scale_regions


def test_default_grid_of_a_1024x768_image_has_the_40_regions_derived_by_hand():
    """W=32, H=24: the short side is 24 and the long side gets one extra region (m=1,
    overlap (24² - 24·8)/24² = 0.67 is the closest to 0.4 among 2..7 regions).

    scale 1: side floor(48/2)=24, 1 row x 2 cols, x starts 0, 8
    scale 2: side 16, 2 x 3, y 0 8, x 0 8 16
    scale 3: side 12, 3 x 4, y 0 6 12, x from floor(5 + i·20/3) - 5 = 0 6 13 20
    scale 4: side 9, 4 x 5, y 0 5 10 15, x from floor(3 + i·5.75) - 3 = 0 5 11 17 23
    """
    expected = []
    for side, ys, xs in [
        (24, [0], [0, 8]),
        (16, [0, 8], [0, 8, 16]),
        (12, [0, 6, 12], [0, 6, 13, 20]),
        (9, [0, 5, 10, 15], [0, 5, 11, 17, 23]),
    ]:
        expected += [(y, x, y + side, x + side) for y in ys for x in xs]
    regions = rmac_regions(24, 32, 4)
    assert regions.dtype == np.int32
    assert regions.shape == (40, 4)
    np.testing.assert_array_equal(regions, np.array(expected))


def test_level_counts_match_the_paper():
    assert [num_regions(levels) for levels in (1, 2, 3, 4)] == [2, 8, 20, 40]


def test_square_map_has_l_squared_regions_per_scale():
    regions = rmac_regions(16, 16, 3)
    assert len(regions) == 1 + 4 + 9
    np.testing.assert_array_equal(regions[0], [0, 0, 16, 16])
    # Scale 2: side floor(32/3) = 10, starts 0 and 6 on both axes.
    np.testing.assert_array_equal(
        regions[1:5], [[0, 0, 10, 10], [0, 6, 10, 16], [6, 0, 16, 10], [6, 6, 16, 16]]
    )


def test_portrait_map_is_the_transpose_of_landscape():
    landscape = rmac_regions(24, 32, 4)
    portrait = rmac_regions(32, 24, 4)
    assert len(portrait) == len(landscape)
    as_set = {tuple(r) for r in portrait}
    assert as_set == {(left, top, right, bottom) for top, left, bottom, right in landscape}


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (2, 3), (3, 2), (2, 2), (7, 200)])
@pytest.mark.parametrize("levels", [1, 3, 4, 6])
def test_degenerate_maps_give_no_empty_or_out_of_bounds_region(shape, levels):
    height, width = shape
    regions = rmac_regions(height, width, levels)
    assert len(regions) >= levels
    top, left, bottom, right = regions.T
    assert np.all(bottom > top) and np.all(right > left)
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(bottom <= height) and np.all(right <= width)


def test_relative_grid_maps_back_exactly_onto_the_reference_shape():
    rel = relative_regions(4, (24, 32))
    np.testing.assert_array_equal(scale_regions(rel, 24, 32), rmac_regions(24, 32, 4))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 4), (16, 16), (32, 24), (7, 50)])
def test_scaled_regions_are_never_empty_and_keep_count(shape):
    rel = relative_regions(4, (24, 32))
    regions = scale_regions(rel, *shape)
    assert regions.shape == (40, 4)
    assert np.all(regions[:, 2] > regions[:, 0]) and np.all(regions[:, 3] > regions[:, 1])
    assert np.all(regions[:, 2] <= shape[0]) and np.all(regions[:, 3] <= shape[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"height": 24, "width": 32, "levels": 0}, "levels.*0"),
        ({"height": 0, "width": 32, "levels": 4}, "height.*0"),
        ({"height": 24, "width": -3, "levels": 4}, "width.*-3"),
        ({"height": 24, "width": 32, "levels": 2.5}, "levels.*2.5"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rmac_regions(**kwargs)
