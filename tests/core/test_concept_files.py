"""Where concepts come from: the inline syntax, .txt/.csv/.json files, atomic saving, presets, template modes."""

from __future__ import annotations

import json

import pytest

from erasure_core import ConceptError
from erasure_core.concept_text import normalise
from erasure_core.concepts import Concept, ConceptKind, ConceptSet
from erasure_core.formats.concept_files import (
    FORMAT_NAME,
    PRESET_DIR,
    assemble,
    from_json,
    list_presets,
    load_concept_file,
    load_preset,
    parse_inline,
    parse_preserve,
    save_json,
    to_json,
)

ARTIST = ConceptKind.ARTIST
OBJECT = ConceptKind.OBJECT


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _json_doc(**fields) -> str:
    return json.dumps({"format": FORMAT_NAME, "version": 1, **fields})


def _sample_set() -> ConceptSet:
    return ConceptSet(
        targets=(Concept("Vincent van Gogh", "a painter", ("Van Gogh", "V. van Gogh"), ARTIST),
                 Concept("golden retriever", "a dog", (), OBJECT),
                 Concept("nudity", "", (), ConceptKind.EXPLICIT)),
        preserve=(Concept("Claude Monet", "", ("Monet",), ARTIST), Concept("a cat")),
        templates={"artist": ("{}", "painting by {}"), "*": ("{}", "a photo of {}")},
    )


# -- inline syntax -------------------------------------------------------------------------------

def test_inline_entry_gives_name_aliases_and_anchor():
    assert parse_inline("Vincent van Gogh | Van Gogh | V. van Gogh -> a painter") == [
        Concept("Vincent van Gogh", "a painter", ("Van Gogh", "V. van Gogh"))]


@pytest.mark.parametrize("entry", ['nudity -> ""', "nudity -> ''", "nudity ->", "nudity->"])
def test_quoted_or_bare_arrow_means_empty_anchor_even_when_anchors_are_given(entry):
    assert parse_inline(entry, anchors="a person")[0].anchor == ""


def test_entries_without_arrow_share_a_single_anchor():
    assert [c.anchor for c in parse_inline("Monet; Dali -> a surrealist; Turner", "a painter")] == [
        "a painter", "a surrealist", "a painter"]


def test_entries_without_arrow_take_one_anchor_each_in_order():
    assert [c.anchor for c in parse_inline("Monet; Dali -> a surrealist; Turner", "a painter; an artist")] == [
        "a painter", "a surrealist", "an artist"]


def test_entries_without_arrow_and_no_anchors_erase_toward_nothing():
    assert [c.anchor for c in parse_inline("Monet; Turner")] == ["", ""]


def test_anchor_count_mismatch_names_anchors_input_and_both_counts():
    with pytest.raises(ConceptError, match=r"one per target without '->' \(2\), but got 3") as err:
        parse_inline("Monet; Dali -> a surrealist; Turner", "a; b; c")
    assert err.value.input_name == "anchors"


def test_semicolons_and_newlines_both_separate_entries():
    assert [c.name for c in parse_inline("Monet; Dali\nTurner ;; \n")] == ["Monet", "Dali", "Turner"]


def test_comment_lines_are_dropped():
    assert [c.name for c in parse_inline("# painters\nMonet\n   # indented comment\nDali")] == ["Monet", "Dali"]


def test_trailing_comments_are_dropped_from_names_and_anchors():
    assert parse_inline("Claude Monet  # no arrow\nDali -> a painter # surrealist") == [
        Concept("Claude Monet"), Concept("Dali", "a painter")]


def test_hash_inside_a_name_is_not_a_comment():
    assert parse_inline("C#")[0].name == "C#"


def test_kind_applies_to_every_typed_entry():
    assert {c.kind for c in parse_inline("Monet; Dali -> a painter", kind="artist")} == {ARTIST}


def test_entry_without_a_name_before_the_aliases_is_refused():
    with pytest.raises(ConceptError, match="must start with a name") as err:
        parse_inline("| Van Gogh -> a painter")
    assert err.value.input_name == "targets"


def test_preserve_entries_take_aliases_and_kind():
    assert parse_preserve("Claude Monet | Monet", kind="artist") == [Concept("Claude Monet", "", ("Monet",), ARTIST)]


def test_preserve_refuses_an_arrow():
    with pytest.raises(ConceptError, match="preserved concepts have no anchor") as err:
        parse_preserve("Monet -> a painter")
    assert err.value.input_name == "preserve"


def test_assemble_reads_typed_targets_and_preserve_with_the_kind():
    cs = assemble(targets="Vincent van Gogh | Van Gogh -> a painter", preserve="Monet", kind="artist")
    assert (cs.targets, cs.preserve) == ((Concept("Vincent van Gogh", "a painter", ("Van Gogh",), ARTIST),),
                                         (Concept("Monet", kind=ARTIST),))


def test_assemble_refuses_an_arrow_in_preserve():
    with pytest.raises(ConceptError) as err:
        assemble(targets="Dali", preserve="Monet -> a painter")
    assert err.value.input_name == "preserve"


# -- .txt ----------------------------------------------------------------------------------------

def test_txt_file_uses_the_inline_syntax_kind_and_anchors(tmp_path):
    path = _write(tmp_path, "list.txt", "# artists\nVincent van Gogh | Van Gogh -> a painter\nClaude Monet  # free\n")
    assert load_concept_file(path, kind="artist", anchors="an artist").targets == (
        Concept("Vincent van Gogh", "a painter", ("Van Gogh",), ARTIST), Concept("Claude Monet", "an artist", (), ARTIST))


def test_utf8_bom_is_accepted_in_txt(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffSalvador Dalí -> a painter\n".encode())
    assert load_concept_file(path).targets == (Concept("Salvador Dalí", "a painter"),)


# -- .csv ----------------------------------------------------------------------------------------

def test_csv_columns_are_matched_case_insensitively(tmp_path):
    path = _write(tmp_path, "c.csv", "Target,ANCHOR\nVincent van Gogh,a painter\n")
    assert load_concept_file(path).targets == (Concept("Vincent van Gogh", "a painter"),)


def test_csv_name_column_stands_for_target(tmp_path):
    path = _write(tmp_path, "c.csv", "name,anchor\nMickey Mouse,a cartoon mouse\n")
    assert load_concept_file(path).targets == (Concept("Mickey Mouse", "a cartoon mouse"),)


def test_csv_aliases_are_split_on_pipes(tmp_path):
    path = _write(tmp_path, "c.csv", "target,anchor,aliases\nVincent van Gogh,a painter,Van Gogh | V. van Gogh\n")
    assert load_concept_file(path).targets[0].aliases == ("Van Gogh", "V. van Gogh")


def test_csv_row_kind_overrides_the_default_kind(tmp_path):
    path = _write(tmp_path, "c.csv", "target,kind\nMonet,\ngolden retriever,object\n")
    assert [t.kind for t in load_concept_file(path, kind="artist").targets] == [ARTIST, OBJECT]


def test_csv_preserve_only_row_adds_a_preserved_concept_and_no_target(tmp_path):
    path = _write(tmp_path, "c.csv", "target,anchor,preserve\nDali,a painter,\n,,Claude Monet\n")
    cs = load_concept_file(path)
    assert (cs.target_names, cs.preserve) == (("Dali",), (Concept("Claude Monet"),))


def test_csv_without_target_name_or_preserve_column_lists_the_found_columns(tmp_path):
    path = _write(tmp_path, "c.csv", "concept,anchor\nDali,a painter\n")
    with pytest.raises(ConceptError, match="its header has: 'concept', 'anchor'") as err:
        load_concept_file(path)
    assert err.value.input_name == "file"


def test_csv_bad_kind_names_the_line(tmp_path):
    path = _write(tmp_path, "c.csv", "target,kind\nMonet,artist\nDali,painter\n")
    with pytest.raises(ConceptError, match=r"c\.csv line 3: kind must be one of .*but got 'painter'") as err:
        load_concept_file(path)
    assert err.value.input_name == "file"


def test_utf8_bom_is_accepted_in_csv_header(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftarget,anchor\r\nDali,a painter\r\n".encode())
    assert load_concept_file(path).targets == (Concept("Dali", "a painter"),)


# -- .json ---------------------------------------------------------------------------------------

def test_json_round_trip_gives_an_equal_set():
    original = _sample_set()
    assert from_json(to_json(original, name="mine")) == original


def test_save_json_then_load_gives_an_equal_set(tmp_path):
    original = _sample_set()
    save_json(original, tmp_path / "mine.json")
    assert load_concept_file(tmp_path / "mine.json") == original


def test_saved_json_records_format_version_and_the_file_stem_as_name(tmp_path):
    save_json(_sample_set(), tmp_path / "mine.json")
    data = json.loads((tmp_path / "mine.json").read_text(encoding="utf-8"))
    assert (data["format"], data["version"], data["name"]) == (FORMAT_NAME, 1, "mine")


def test_json_plain_string_entries_are_accepted():
    cs = from_json(_json_doc(targets=["Dali", "Monet"], preserve=["Turner"]))
    assert (cs.targets, cs.preserve) == ((Concept("Dali"), Concept("Monet")), (Concept("Turner"),))


def test_malformed_json_reports_line_and_column(tmp_path):
    path = _write(tmp_path, "bad.json",
                  '{\n  "format": "concept_erasure.concepts",\n  "version": 1,\n  "targets": ["a",]\n}\n')
    with pytest.raises(ConceptError, match="line 4 column 19") as err:
        load_concept_file(path)
    assert err.value.input_name == "file"


@pytest.mark.parametrize("text, message", [
    (json.dumps({"format": "something.else", "version": 1, "targets": ["a"]}), "must be a concept list"),
    (json.dumps(["a", "b"]), "must be a concept list"),
    (_json_doc(version=2, targets=["a"]), "must be version 1, but got 2"),
    (json.dumps({"format": FORMAT_NAME, "targets": ["a"]}), "must be version 1, but got None"),
    (_json_doc(targets=["a"], target=["b"]), "unknown keys 'target'; expected"),
    (_json_doc(targets=[{"anchor": "a painter"}]), r"targets\[0\] must be a name or an object"),
    (_json_doc(targets=[{"name": "Dali", "anchr": "a painter"}]), r"targets\[0\] must be a name or an object"),
    (_json_doc(targets=["a"], preserve=[{"name": "b", "anchor": "c"}]), r"preserve\[0\] must be a name or an object"),
    (_json_doc(targets=[{"name": "Dali", "aliases": "Salvador"}]), r"targets\[0\]\.aliases must be a list"),
    (_json_doc(targets=[3]), r"targets\[0\] must be a name or an object"),
], ids=["wrong-format", "not-an-object", "wrong-version", "no-version", "unknown-top-key", "missing-name",
        "unknown-entry-key", "anchor-in-preserve", "aliases-not-a-list", "number-entry"])
def test_invalid_json_documents_are_refused_on_the_file_input(tmp_path, text, message):
    path = _write(tmp_path, "bad.json", text)
    with pytest.raises(ConceptError, match=message) as err:
        load_concept_file(path)
    assert err.value.input_name == "file"


def test_utf8_bom_is_accepted_in_json(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(("\ufeff" + _json_doc(targets=["Dali"])).encode())
    assert load_concept_file(path).target_names == ("Dali",)


# -- any file ------------------------------------------------------------------------------------

def test_non_utf8_bytes_are_refused_with_their_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Monet\nTurner\nSalvador Dal\xed\n")
    with pytest.raises(ConceptError, match="non-UTF-8 byte at line 3") as err:
        load_concept_file(path)
    assert err.value.input_name == "file"


def test_unsupported_extension_is_refused(tmp_path):
    path = _write(tmp_path, "list.yaml", "- Dali\n")
    with pytest.raises(ConceptError, match=r"must be \.txt, \.csv, \.json, but got 'list\.yaml'") as err:
        load_concept_file(path)
    assert err.value.input_name == "file"


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConceptError, match="'absent.txt' is not") as err:
        load_concept_file(tmp_path / "absent.txt")
    assert err.value.input_name == "file"


def test_extension_is_matched_case_insensitively(tmp_path):
    path = _write(tmp_path, "LIST.TXT", "Dali\n")
    assert load_concept_file(path).target_names == ("Dali",)


# -- atomic save ---------------------------------------------------------------------------------

def _failing_replace(monkeypatch):
    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("erasure_core.formats.concept_files.os.replace", boom)


def test_failed_save_keeps_the_existing_file(tmp_path, monkeypatch):
    path = _write(tmp_path, "mine.json", "old content")
    _failing_replace(monkeypatch)
    with pytest.raises(OSError):
        save_json(_sample_set(), path)
    assert path.read_text(encoding="utf-8") == "old content"


def test_failed_save_leaves_no_temp_file(tmp_path, monkeypatch):
    path = _write(tmp_path, "mine.json", "old content")
    _failing_replace(monkeypatch)
    with pytest.raises(OSError):
        save_json(_sample_set(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]


def test_successful_save_leaves_only_the_target_file(tmp_path):
    save_json(_sample_set(), tmp_path / "mine.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.json"]


# -- presets -------------------------------------------------------------------------------------

PRESET_KINDS = {"artists": ARTIST, "celebrities": ConceptKind.CELEBRITY, "objects": OBJECT,
                "characters": ConceptKind.CHARACTER, "explicit": ConceptKind.EXPLICIT}
ALL_PRESETS = sorted(set(PRESET_KINDS) | set(list_presets()))


@pytest.fixture
def presets_exist():
    if not PRESET_DIR.is_dir():
        pytest.skip("erasure_core/presets/ does not exist yet")


def test_the_documented_presets_are_listed(presets_exist):
    assert set(PRESET_KINDS) <= set(list_presets())


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_preset_has_targets_and_a_preserve_list(presets_exist, name):
    cs = load_preset(name)
    assert cs.targets and cs.preserve


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_preset_targets_share_the_preset_kind(presets_exist, name):
    kinds = {t.kind for t in load_preset(name).targets}
    expected = {PRESET_KINDS[name]} if name in PRESET_KINDS else kinds
    assert len(kinds) == 1 and kinds == expected


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_preset_preserves_none_of_its_targets_or_aliases(presets_exist, name):
    cs = load_preset(name)
    erased = {normalise(n) for t in cs.targets for n in t.names}
    assert [n for p in cs.preserve for n in p.names if normalise(n) in erased] == []


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_preset_loads_without_warnings(presets_exist, name):
    assert load_preset(name).warnings == ()


def test_unknown_preset_is_refused_listing_the_known_ones(presets_exist):
    with pytest.raises(ConceptError, match=r"preset must be one of \[.*'artists'.*\], but got 'painters'") as err:
        load_preset("painters")
    assert err.value.input_name == "preset"


# -- template modes ------------------------------------------------------------------------------

def test_template_mode_none_uses_names_as_they_are():
    assert assemble(targets="Monet -> a painter", kind="artist", templates="none").erase_pairs() == [
        ("Monet", "a painter")]


def test_template_mode_none_drops_a_files_templates(tmp_path):
    path = _write(tmp_path, "t.json", _json_doc(targets=["Dali"], templates={"*": ["{}", "art by {}"]}))
    assert assemble(file=path, templates="none").erase_pairs() == [("Dali", "")]


def test_builtin_templates_give_artist_prompts_for_an_artist():
    pairs = assemble(targets="Monet -> a painter", kind="artist", templates="built-in per kind").erase_pairs()
    assert ("painting by Monet", "painting by a painter") in pairs


def test_builtin_templates_give_object_prompts_for_an_object():
    pairs = assemble(targets="golden retriever -> a dog", kind="object", templates="built-in per kind").erase_pairs()
    assert ("photo of golden retriever", "photo of a dog") in pairs and not any(
        t.startswith("painting by") for t, _ in pairs)


def test_builtin_templates_keep_the_plain_name():
    pairs = assemble(targets="Monet -> a painter", kind="artist", templates="built-in per kind").erase_pairs()
    assert ("Monet", "a painter") in pairs


def test_custom_templates_apply_to_every_kind():
    extra = ConceptSet((Concept("golden retriever", "a dog", kind=OBJECT),))
    cs = assemble(targets="Monet -> a painter", kind="artist", templates="custom",
                  custom_templates="{}\nart by {}", extra=extra)
    assert cs.erase_pairs() == [("Monet", "a painter"), ("art by Monet", "art by a painter"),
                                ("golden retriever", "a dog"), ("art by golden retriever", "art by a dog")]


@pytest.mark.parametrize("custom", ["", "  \n", "# only a comment"])
def test_custom_mode_without_templates_is_refused(custom):
    with pytest.raises(ConceptError, match="at least one template") as err:
        assemble(targets="Monet", templates="custom", custom_templates=custom)
    assert err.value.input_name == "custom_templates"


def test_as_given_keeps_a_json_files_templates(tmp_path):
    path = _write(tmp_path, "t.json", _json_doc(targets=[{"name": "Dali", "kind": "artist"}],
                                                 templates={"artist": ["{}", "a painting by {}"]}))
    assert dict(assemble(file=path, templates="as given").templates) == {"artist": ("{}", "a painting by {}")}


def test_as_given_uses_typed_names_as_they_are():
    assert assemble(targets="Monet -> a painter", kind="artist").erase_pairs() == [("Monet", "a painter")]


# -- regressions found in review ---------------------------------------------------------------


def test_a_semicolon_inside_a_comment_makes_no_target():
    names = [c.name for c in parse_inline("Monet # painter; impressionist\n#a; b\nDali")]
    assert names == ["Monet", "Dali"]


def test_comments_are_stripped_from_the_anchors_text():
    assert parse_inline("Monet", anchors="a painter # for all")[0].anchor == "a painter"


@pytest.mark.parametrize("body", [
    '"targets": [{"name": "x", "anchor": 3}]',
    '"targets": "abc"',
    '"targets": [{"name": "x", "kind": "painter"}]',
    '"targets": [{"name": "x"}], "templates": {"artist": "painting by {}"}',
    '"targets": [{"name": ""}]',
])
def test_json_of_the_wrong_types_is_refused_and_blames_the_file(tmp_path, body):
    path = tmp_path / "bad.json"
    path.write_text('{"format": "concept_erasure.concepts", "version": 1, ' + body + "}")
    with pytest.raises(ConceptError) as err:
        load_concept_file(path)
    assert err.value.input_name == "file" and "bad.json" in err.value.message


def test_csv_errors_report_the_physical_line_of_a_multiline_row(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text('target,kind\n"Van\nGogh",artist\nMonet,painter\n')
    with pytest.raises(ConceptError, match="line 4"):
        load_concept_file(path)


def test_a_bad_txt_entry_blames_the_file(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("| x -> y\n")
    with pytest.raises(ConceptError) as err:
        load_concept_file(path)
    assert err.value.input_name == "file" and err.value.message.startswith("list.txt")


def test_aliases_differing_only_in_case_count_once():
    from erasure_core import Concept

    assert Concept("Van Gogh", "a painter", ("van gogh", "VAN  GOGH", "Vincent")).aliases == ("Vincent",)


def test_a_bad_custom_template_blames_custom_templates():
    with pytest.raises(ConceptError) as err:
        assemble(targets="Monet", templates="custom", custom_templates="a painting by")
    assert err.value.input_name == "custom_templates"


def test_saved_files_are_readable_by_others(tmp_path):
    from erasure_core import ConceptSet

    path = tmp_path / "team.json"
    save_json(ConceptSet.simple(("Monet",)), path)
    assert path.stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize("text, line", [
    ("target\nDali\n" + "a" * 200_000 + "\n", 3),  # a cell over the csv module's 128 KiB
    ('target\n"Dali\nMonet\n' + "a" * 140_000, 2),  # a quote left open runs into the limit
    ("c" * 140_000 + "\nDali\n", 1),  # in the header
])
def test_a_csv_cell_past_the_csv_limit_is_refused_on_the_file_input_with_its_line(tmp_path, text, line):
    path = _write(tmp_path, "big.csv", text)
    with pytest.raises(ConceptError, match=f"big\\.csv line {line}: the CSV must be readable, but 'field larger "
                                           "than field limit \\(131072\\)'. Close a quote") as err:
        assemble(file=path)
    assert err.value.input_name == "file"
