"""The one registry type: register (call or decorator), look up, list, and the one wording
of an unknown name that every extension point shares."""

from __future__ import annotations

import pytest

from bonecomp.config import ConfigError
from bonecomp.registry import Registry


def test_entries_are_registered_by_call_or_decorator_and_listed_in_order():
    reg: Registry[int] = Registry("colour", "draw.colours")
    assert reg.register("red", 1) == 1

    @reg.register("blue")
    def blue() -> int:
        return 2

    assert reg.names() == ["red", "blue"] and list(reg) == ["red", "blue"] and len(reg) == 2
    assert reg.get("red") == 1 and reg.get("blue") is blue
    assert "red" in reg and "green" not in reg and 3 not in reg


def test_an_unknown_name_is_one_line_naming_the_key_and_the_valid_ones():
    reg: Registry[int] = Registry("colour", "draw.colours")
    reg.register("red", 1)
    reg.register("blue", 2)
    with pytest.raises(ConfigError) as e:
        reg.get("green")
    assert str(e.value) == "draw.colours: unknown colour 'green'; valid: red, blue"
    assert e.value.key == "draw.colours"
    with pytest.raises(ConfigError, match=r"^draw\.colours\[1\]: unknown colour 'pink'"):
        reg.check(["red", "pink"])
    with pytest.raises(ConfigError, match=r"^other\.key: unknown colour"):
        reg.get("pink", key="other.key")


def test_a_second_registration_is_refused_unless_replaced():
    reg: Registry[int] = Registry("colour", "draw.colours")
    reg.register("red", 1)
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        reg.register("red", 2)
    reg.register("red", 3, replace=True)
    assert reg.get("red") == 3
    reg.unregister("red")
    assert "red" not in reg


def test_case_folding_registries_find_any_spelling():
    reg: Registry[int] = Registry("architecture", "model.arch", fold_case=True)
    reg.register("UNet", 1)
    assert reg.get("unet") == 1 and "UNET" in reg and reg.names() == ["unet"]
