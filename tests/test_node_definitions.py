"""Every node of the pack as the editor lists it: a category, a description and a tooltip on every input."""


def test_every_input_has_a_tooltip(comfyui):
    pack = comfyui.pack
    assert pack.NODE_CLASS_MAPPINGS
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("DC-Gen"), name
        assert getattr(cls, "DESCRIPTION", ""), name
        assert pack.NODE_DISPLAY_NAME_MAPPINGS.get(name), name
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, entry in spec.get(section, {}).items():
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                assert options.get("tooltip"), f"{name}.{input_name}"
