"""docs/settings.md is generated from the settings class: a setting added, removed or redocumented without
regenerating it (`python -m server.settings > docs/settings.md`) fails here."""

from pathlib import Path

from server.settings import Settings, settings_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def test_settings_doc_is_the_generated_table():
    assert DOC.read_text() == settings_table()


def test_every_setting_is_documented():
    missing = [n for n, f in Settings.model_fields.items() if not f.description]
    assert not missing, f"settings without a description: {missing}"


def test_readme_summary_table_is_computed_from_the_results():
    """The README's measurement table is `python -m bench.summary --write`'s output, never typed by hand."""
    from bench.summary import END, README, START, table

    text = README.read_text()
    assert text[text.index(START) + len(START) : text.index(END)].strip() == table()
