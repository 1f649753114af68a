import numpy as np
import pytest

from patchify.pyramid import grid_edges, level_boxes, levels_for, patches_per_image


@pytest.mark.parametrize("width,height", [(640, 480), (641, 479), (7, 5), (1001, 333), (4, 4)])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_level_boxes_tile_the_image_exactly(width, height, level):
    boxes = level_boxes(width, height, level)
    assert boxes.shape == ((level + 1) ** 2, 4)
    cover = np.zeros((height, width), np.int32)
    for x, y, w, h in boxes:
        assert w > 0 and h > 0
        cover[y:y + h, x:x + w] += 1
    assert (cover == 1).all()  # every pixel in exactly one cell: no gap, no overlap


def test_cells_are_near_equal_and_row_major():
    boxes = level_boxes(10, 7, 2)
    assert boxes[:3, 1].tolist() == [0, 0, 0] and boxes[::3, 0].tolist() == [0, 0, 0]
    assert set(boxes[:, 2].tolist()) <= {3, 4} and set(boxes[:, 3].tolist()) <= {2, 3}
    assert grid_edges(10, 3).tolist() == [0, 3, 7, 10]


def test_levels_and_counts():
    assert levels_for(3, "pyramid") == [0, 1, 2, 3]
    assert levels_for(2, "single") == [2]
    assert patches_per_image(levels_for(3, "pyramid")) == 30
    with pytest.raises(ValueError, match="0..3"):
        levels_for(4, "pyramid")
    with pytest.raises(ValueError, match="multi_scale"):
        levels_for(1, "both")
