"""docs/config.md is what `python -m metarec.config_doc` generates from metarec/config.py,
and it names every config key."""

from pathlib import Path

from metarec.config import Config
from metarec.config_doc import config_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text() == config_reference(), (
        "docs/config.md is out of date: run `python -m metarec.config_doc > docs/config.md`")


def test_every_config_key_has_a_description_in_the_page():
    text = config_reference()
    for section, info in Config.model_fields.items():
        fields = getattr(info.annotation, "model_fields", None)
        keys = [f"{section}.{name}" for name in fields] if fields else [section]
        for key in keys:
            row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
            assert row.rstrip(" |").split("|")[-1].strip(), f"{key} has no description in metarec/config.py"
