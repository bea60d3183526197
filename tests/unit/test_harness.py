"""The harness format (ttc_lightning.oracle.harness): what `load_harness` and `find_harnesses` accept and how they
refuse the rest; and `constant_body`, the do-nothing patch every harness must catch."""

import json
import shutil
from pathlib import Path

import pytest

from ttc_lightning.errors import TTCError
from ttc_lightning.oracle.check import constant_body
from ttc_lightning.oracle.harness import MANIFEST, Harness, find_harnesses, load_harness

FIELDS = {
    "idx": 123,
    "fixed_idx": 124,
    "language": "c",
    "proof": "overflow",
    "tests": ["small", "empty"],
    "triggers": "a 20-byte copy into 8 bytes",
    "simplifies": "nothing",
}
SOURCE = '#include <string.h>\n#include "function.c"\nint main(int argc, char **argv) { return 2; }\n'
DROP = object()  # a field left out


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return json.dumps(value)  # a JSON string, number or list of them is that TOML value too


def make(root: Path, name: str = "123", source: str | None = SOURCE, source_name: str = "harness.c", **changes) -> Path:
    """A harness directory `root/name` with FIELDS (`changes` replace them; DROP leaves one out) and `source`."""
    directory = root / name
    directory.mkdir(parents=True)
    fields = {k: v for k, v in {**FIELDS, **changes}.items() if v is not DROP}
    (directory / MANIFEST).write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in fields.items()))
    if source is not None:
        (directory / source_name).write_text(source)
    return directory


def refused(directory: Path) -> str:
    with pytest.raises(TTCError) as e:
        load_harness(directory)
    return str(e.value)


def test_a_minimal_harness_has_its_fields(tmp_path):
    harness = load_harness(make(tmp_path))
    assert harness == Harness(
        directory=tmp_path / "123",
        idx="123",
        fixed_idx="124",
        language="c",
        proof="overflow",
        tests=("small", "empty"),
        flags=(),  # the optional fields' defaults: no flags, 5 s a case, no CVE or CWE
        timeout=5.0,
        cve="",
        cwe=(),
        triggers="a 20-byte copy into 8 bytes",
        simplifies="nothing",
        digest=harness.digest,  # below
    )
    assert (harness.source, harness.function_file, harness.cases) == (
        "harness.c",
        "function.c",
        ("overflow", "small", "empty"),
    )


def test_a_cpp_harness_with_every_field(tmp_path):
    source = '#include "function.cpp"\nint main() { return 2; }\n'
    changes = {"language": "cpp", "idx": "123", "project": "p", "cve": "CVE-2099-0001", "timeout": 2}
    directory = make(
        tmp_path, source=source, source_name="harness.cpp", cwe=["CWE-787", "CWE-125"], flags=["-DN=1"], **changes
    )
    harness = load_harness(directory)  # idx "123": a string of digits is an idx too
    assert (harness.idx, harness.language, harness.source, harness.function_file) == (
        "123",
        "cpp",
        "harness.cpp",
        "function.cpp",
    )
    assert (harness.cve, harness.cwe, harness.flags, harness.timeout) == (
        "CVE-2099-0001",
        ("CWE-787", "CWE-125"),
        ("-DN=1",),
        2.0,
    )


def test_the_digest_follows_every_file(tmp_path):
    directory = make(tmp_path)
    first = load_harness(directory).digest
    assert load_harness(directory).digest == first
    shutil.copytree(directory, tmp_path / "copy" / "123")
    assert load_harness(tmp_path / "copy" / "123").digest == first  # the same files: the same verdicts
    (directory / "harness.c").write_text(SOURCE + "/* changed */\n")
    second = load_harness(directory).digest
    (directory / "stub.h").write_text("#define N 8\n")
    third = load_harness(directory).digest
    (directory / MANIFEST).write_text((directory / MANIFEST).read_text().replace('"nothing"', '"less"'))
    assert len({first, second, third, load_harness(directory).digest}) == 4


def test_the_digest_follows_links_and_refuses_what_is_not_a_file(tmp_path):
    directory = make(tmp_path)
    first = load_harness(directory).digest
    (tmp_path / "kept.h").write_text("#define N 8\n")
    (directory / "include").mkdir()
    (directory / "include" / "stub.h").symlink_to(tmp_path / "kept.h")
    linked = load_harness(directory).digest
    (tmp_path / "kept.h").write_text("#define N 9\n")  # what the link points to is what the check copies
    assert len({first, linked, load_harness(directory).digest}) == 3
    (directory / "zero").symlink_to("/dev/zero")
    with pytest.raises(TTCError, match="zero: not a file"):
        load_harness(directory)
    (directory / "zero").unlink()
    (directory / "include" / "loop").symlink_to(directory)
    with pytest.raises(TTCError, match="a link that leads back into the harness"):
        load_harness(directory)


# ---------------------------------------------------------------- refused: the manifest's file and field named


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"proof": DROP}, "missing field 'proof'"),
        ({"triggers": DROP}, "missing field 'triggers'"),
        ({"prof": "overflow"}, "unknown field 'prof'; did you mean 'proof'?"),
        ({"colour": "red"}, "unknown field 'colour'; the fields are idx, fixed_idx"),
        ({"idx": 124}, "idx = 124 but the directory is named '123'"),
        ({"idx": "12a"}, "field 'idx' must be a record idx (an integer), got '12a'"),
        ({"fixed_idx": True}, "field 'fixed_idx' must be a record idx (an integer), got True"),
        ({"fixed_idx": -124}, "field 'fixed_idx' must be a record idx (an integer), got -124"),
        ({"language": "rust"}, "field 'language' must be \"c\" or \"cpp\", got 'rust'"),
        ({"tests": []}, "field 'tests' must be a non-empty list of case names, got []"),
        ({"tests": "small"}, "field 'tests' must be a non-empty list of case names, got 'small'"),
        ({"tests": ["small", "small"]}, "field 'tests' repeats a case"),
        ({"tests": ["small", "overflow"]}, "field 'tests' repeats a case (or the proof's)"),
        ({"proof": "../overflow"}, "field 'proof': '../overflow' is not a case name"),
        ({"proof": "-v"}, "field 'proof': '-v' is not a case name"),  # it would read as an option
        ({"tests": ["small", "no space"]}, "field 'tests': 'no space' is not a case name"),
        ({"tests": ["small", 3]}, "field 'tests': 3 is not a case name"),
        ({"timeout": 0}, "field 'timeout' must be seconds above 0, at most 3600, got 0"),
        ({"timeout": -1.5}, "field 'timeout' must be seconds above 0, at most 3600, got -1.5"),
        ({"timeout": "5"}, "field 'timeout' must be seconds above 0, at most 3600, got '5'"),
        ({"timeout": True}, "field 'timeout' must be seconds above 0, at most 3600, got True"),
        ({"timeout": float("inf")}, "field 'timeout' must be seconds above 0, at most 3600, got inf"),
        ({"timeout": 1e300}, "field 'timeout' must be seconds above 0, at most 3600, got 1e+300"),
        ({"triggers": "  "}, "field 'triggers' must be a non-empty string"),
        ({"cve": 1}, "field 'cve' must be a non-empty string, got 1"),
        ({"cwe": [787]}, "field 'cwe' must be a list of strings, got [787]"),
        ({"flags": "-O2"}, "field 'flags' must be a list of strings, got '-O2'"),
    ],
)
def test_a_bad_field_is_refused_naming_the_manifest_and_the_field(tmp_path, changes, message):
    directory = make(tmp_path, **changes)
    error = refused(directory)
    assert error.startswith(f"{directory / MANIFEST}: ") and message in error


def test_a_missing_manifest_is_refused(tmp_path):
    (tmp_path / "123").mkdir()
    error = refused(tmp_path / "123")
    assert error.startswith(f"{tmp_path / '123' / MANIFEST}: cannot read the harness manifest (No such file")


def test_invalid_toml_is_refused_with_its_line(tmp_path):
    directory = make(tmp_path)
    (directory / MANIFEST).write_text('idx = 123\nfixed_idx = \nlanguage = "c"\n')
    error = refused(directory)
    assert error.startswith(f"{directory / MANIFEST}: not valid TOML: ") and "line 2" in error


@pytest.mark.parametrize(
    ("language", "present", "missing"), [("c", "harness.cpp", "harness.c"), ("cpp", "harness.c", "harness.cpp")]
)
def test_a_missing_source_is_refused(tmp_path, language, present, missing):
    directory = make(tmp_path, language=language, source_name=present)
    error = refused(directory)
    assert error == f"{directory / missing}: missing; a {language} harness is compiled from {missing}"


@pytest.mark.parametrize(
    ("language", "source_name", "include"),
    [("c", "harness.c", '#include "function.c"'), ("cpp", "harness.cpp", '#include "function.cpp"')],
)
def test_a_source_without_the_include_line_is_refused(tmp_path, language, source_name, include):
    # The C++ harness includes the C file name: not where the C++ function goes.
    source = SOURCE.replace('#include "function.c"', "" if language == "c" else '#include "function.c"')
    directory = make(tmp_path, language=language, source_name=source_name, source=source)
    error = refused(directory)
    assert error == f"{directory / source_name}: has no line {include}, where the patched function goes"


# ---------------------------------------------------------------- find_harnesses


def test_find_harnesses_reads_each_harness_by_idx(tmp_path):
    make(tmp_path, "123")
    make(tmp_path, "77", idx=77, fixed_idx=78)
    (tmp_path / "README.md").write_text("not a harness\n")
    (tmp_path / "notes").mkdir()  # no manifest: not a harness
    harnesses = find_harnesses(tmp_path)
    assert sorted(harnesses) == ["123", "77"]
    assert (harnesses["77"].directory, harnesses["77"].fixed_idx) == (tmp_path / "77", "78")


def test_find_harnesses_refuses_a_file(tmp_path):
    (tmp_path / "harnesses").write_text("")
    with pytest.raises(TTCError, match="not a directory of harnesses") as e:
        find_harnesses(tmp_path / "harnesses")
    assert str(e.value).startswith(f"{tmp_path / 'harnesses'}: ")
    with pytest.raises(TTCError, match="not a directory of harnesses"):
        find_harnesses(tmp_path / "absent")


def test_find_harnesses_refuses_a_directory_without_harnesses(tmp_path):
    with pytest.raises(TTCError, match="holds no harness") as e:
        find_harnesses(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: ")
    (tmp_path / "notes").mkdir()
    with pytest.raises(TTCError, match="holds no harness"):
        find_harnesses(tmp_path)


def test_find_harnesses_refuses_a_bad_harness_among_good_ones(tmp_path):
    make(tmp_path, "123")
    make(tmp_path, "77", idx=77, language="rust")
    with pytest.raises(TTCError, match="field 'language'") as e:
        find_harnesses(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / '77' / MANIFEST}: ")


# ---------------------------------------------------------------- constant_body


@pytest.mark.parametrize(
    ("function", "language", "expected"),
    [
        ("int f(int x)\n{\n  return x + 1;\n}\n", "c", "int f(int x)\n{ return 0; }\n"),
        (
            "static char *\nfind(char *s, int c)\n{\n  return strchr(s, c);\n}",
            "c",
            "static char *\nfind(char *s, int c)\n{ return 0; }\n",
        ),
        ("void f(int *p)\n{\n  *p = 1;\n}", "c", "void f(int *p)\n{  }\n"),
        ("static void\nf(int *p) {\n  *p = 1;\n}", "c", "static void\nf(int *p) {  }\n"),
        ("void *f(size_t n)\n{\n  return malloc(n);\n}", "c", "void *f(size_t n)\n{ return 0; }\n"),  # a pointer
        ("void* f(size_t n)\n{\n  return malloc(n);\n}", "c", "void* f(size_t n)\n{ return 0; }\n"),
        (
            "std::string Name::get() const\n{\n  return name_;\n}",
            "cpp",
            "std::string Name::get() const\n{ return {}; }\n",
        ),
        ("void Name::clear()\n{\n  name_.clear();\n}", "cpp", "void Name::clear()\n{  }\n"),
        (
            # The parameter list holds parentheses (a function pointer): the body starts after its closing one.
            "int apply(int (*fn)(int), int x)\n{\n  return fn(x);\n}",
            "c",
            "int apply(int (*fn)(int), int x)\n{ return 0; }\n",
        ),
        (
            "static int walk(struct node *n, void (*visit)(struct node *, void *), void *arg)\n{\n"
            "  if (n) visit(n, arg);\n  return 1;\n}",
            "c",
            "static int walk(struct node *n, void (*visit)(struct node *, void *), void *arg)\n{ return 0; }\n",
        ),
    ],
)
def test_constant_body(function, language, expected):
    assert constant_body(function, language) == expected
