from __future__ import annotations

import subprocess
import sys

import toka


def test_all_lists_every_public_name() -> None:
    public = {name for name in dir(toka) if not name.startswith("_")}
    modules = {name for name in public if type(getattr(toka, name)) is type(toka)}
    assert set(toka.__all__) == public - modules - {"annotations"}


def test_all_is_sorted_and_importable() -> None:
    assert toka.__all__ == sorted(toka.__all__, key=lambda n: (not n.isupper(), n))
    for name in toka.__all__:
        assert getattr(toka, name) is not None


def test_importing_the_package_imports_neither_pydantic_nor_prefect() -> None:
    # The `toka` command imports the package before it decides to hand a run to a warm
    # process; that decision must cost milliseconds, not the seconds of these imports.
    code = "import sys, toka, toka.warm; print(sorted({'pydantic', 'prefect', 'anthropic', 'yaml'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
