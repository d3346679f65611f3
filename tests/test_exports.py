from __future__ import annotations

import toka


def test_all_lists_every_public_name() -> None:
    public = {name for name in vars(toka) if not name.startswith("_")}
    modules = {name for name, value in vars(toka).items() if type(value) is type(toka)}
    assert set(toka.__all__) == public - modules - {"annotations"}


def test_all_is_sorted_and_importable() -> None:
    assert toka.__all__ == sorted(toka.__all__, key=lambda n: (not n.isupper(), n))
    for name in toka.__all__:
        assert getattr(toka, name) is not None
