from __future__ import annotations

import pytest

from napari_wsss_cram.core.classes import WSSS4LUAD, ClassSpec, class_spec_from_names


def test_wsss4luad_convention():
    assert WSSS4LUAD.names == ("tumor", "stroma", "normal")
    assert WSSS4LUAD.background_index == 3
    assert WSSS4LUAD.num_outputs == 4
    pal = WSSS4LUAD.palette()
    assert len(pal) == 768
    assert pal[0:3] == [0, 64, 128] and pal[9:12] == [255, 255, 255]


def test_configurable_classes_get_distinct_colours_and_round_trip():
    spec = class_spec_from_names("tumor, necrosis, stroma, lymphocytes, mucus")
    assert spec.num_classes == 5 and spec.background_index == 5
    assert len(set(spec.colors)) == 5
    assert spec.colors[0] == WSSS4LUAD.colors[0]
    assert ClassSpec.from_dict(spec.to_dict()) == spec
    assert spec.index_of("Necrosis") == 1 and spec.index_of("background") == 5


@pytest.mark.parametrize("names", [(), ("a", "A"), ("tumor", "background"), ("a", "")])
def test_bad_class_names_are_refused(names):
    with pytest.raises(ValueError):
        ClassSpec(names)
