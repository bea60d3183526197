"""What a patch may change (ttc_lightning.oracle.scope): the function, and nothing of the harness around it."""

import json

import pytest

from tests.helpers import REAL_PRIMEVUL
from ttc_lightning.oracle.scope import outline, outside_the_function

F = """static int get(const char *buf, size_t len, size_t at)
{
    /* a comment with { and #define in it */
    const char *open = "{";
    char close = '}';
    if (at >= len)
        return -1;
    return buf[at];
}
"""
K_AND_R = "int add(a, b)\nint a;\nint b;\n{\n    return a + b;\n}\n"
LOCAL_MACRO = "int f(int x)\n{\n#define TWICE(v) ((v) * 2)\n    return TWICE(x);\n#undef TWICE\n}\n"


def test_outline_of_a_function():
    # one body; the braces and the #define inside the comment and literals are not code
    o = outline(F)
    assert (o.blocks, o.semicolons, o.tail, dict(o.directives), dict(o.words)) == (1, 0, "", {}, {})
    # K&R: two declarations at top level, before the body
    assert outline(K_AND_R).semicolons == 2
    assert dict(outline(LOCAL_MACRO).directives) == {"define": 1, "undef": 1}


@pytest.mark.parametrize(
    "patched",
    [
        F.replace("if (at >= len)", "if (buf == NULL || at >= len)"),  # a bounds check: what fixes are
        F.replace("    return buf[at];", "#ifdef STRICT\n    if (!buf[at]) return -1;\n#endif\n    return buf[at];"),
        F.replace("    return buf[at];", '    printf("{ #define x\\n");\n    return buf[at];'),  # inside a string
        F + "/* trailing comment */\n",
    ],
)
def test_changes_inside_the_function_are_allowed(patched):
    assert outside_the_function(patched, F) is None


def test_what_the_original_holds_stays_allowed():
    assert outside_the_function(K_AND_R.replace("a + b", "b + a"), K_AND_R) is None
    assert outside_the_function(LOCAL_MACRO.replace("TWICE(x)", "TWICE(x + 1)"), LOCAL_MACRO) is None
    # a second #define is not in the original
    more = LOCAL_MACRO.replace("#undef", "#define main other\n#undef")
    assert outside_the_function(more, LOCAL_MACRO) == "it adds #define, which changes code beyond the function"


@pytest.mark.parametrize(
    ("patched", "why"),
    [
        (F + "int main(void) { return 0; }\n", "it adds a definition beside the function"),
        (F + "#define main unused_main\n", "it adds code after the function's closing brace"),
        (F + "int main(void);\n", "it adds code after the function's closing brace"),
        ("int main(void);\n" + F, "it adds a declaration outside the function's body"),
        (F.replace("    return buf[at];", "#define assert(x)\n    return buf[at];"), "it adds #define"),
        (F.replace("    return buf[at];", "%:define assert(x)\n    return buf[at];"), "it adds #define"),  # digraph
        (F.replace("    return buf[at];", "#\\\ndefine assert(x)\n    return buf[at];"), "it adds #define"),  # spliced
        (F.replace("    return buf[at];", '#include "/dev/zero"\n    return buf[at];'), "it adds #include"),
        (F.replace("    return buf[at];", "#pragma GCC poison main\n    return buf[at];"), "it adds #pragma"),
        (F.replace("    return buf[at];", '    _Pragma("GCC poison x")\n    return buf[at];'), "it adds _Pragma"),
        (F.replace("    return buf[at];", '    __asm__(".section .init_array");\n    return 0;'), "it adds __asm__"),
        (
            F.replace("    return buf[at];", '    static void (*h)(void) __attribute__((section(".init_array")));'),
            "it adds section",
        ),
        ("__attribute__((constructor)) " + F, "it adds constructor"),
        ("[[gnu::constructor]] " + F, "it adds constructor"),
        # the GNU spellings with `__` on either side, and blanks between the brackets
        ("__attribute__((__constructor__)) " + F, "it adds constructor"),
        ("__attribute__ ( (constructor) ) " + F, "it adds constructor"),
        ("__attribute__(\n(destructor)) " + F, "it adds destructor"),
        ("[ [gnu::__constructor__]] " + F, "it adds constructor"),
        ("__attribute__((__weak__)) " + F, "it adds weak"),
        (
            F.replace("    return buf[at];", '    static int k __attribute__((__section__(".init_array"))) = 0;'),
            "it adds section",
        ),
        # blanks the preprocessor reads as spaces, line ends it reads as line ends, splices with blanks, trigraphs
        (F.replace("    return buf[at];", "\f#define assert(x)\n    return buf[at];"), "it adds #define"),
        (F.replace("    return buf[at];", "#\vdefine assert(x)\n    return buf[at];"), "it adds #define"),
        (F.replace("    return buf[at];", "%:\fdefine assert(x)\n    return buf[at];"), "it adds #define"),
        (F.replace("    return buf[at];", "    return buf[at];\r#define main unused\r"), "it adds #define"),
        (F.replace("    return buf[at];", "#\\  \ndefine assert(x)\n    return buf[at];"), "it adds #define"),
        (F.replace("    return buf[at];", "??=define assert(x)\n    return buf[at];"), "it adds #define"),
        (F.replace("    return buf[at];", '    as\\ \nm("nop");\n    return buf[at];'), "it adds asm"),
        # the sanitizers taken out of the function, or a report survived
        ("__attribute__((no_sanitize_address)) " + F, "it adds no_sanitize_address"),
        ('__attribute__((no_sanitize("address"))) ' + F, "it adds no_sanitize"),
        ('[[clang::no_sanitize("address")]] ' + F, "it adds no_sanitize"),
        (
            F.replace("    return buf[at];", "    __asan_unpoison_memory_region(buf, len + 1);\n    return buf[at];"),
            "it adds __asan_unpoison_memory_region",
        ),
        (
            F.replace("    return buf[at];", "    __sanitizer_set_death_callback(0);\n    return buf[at];"),
            "it adds __sanitizer_set_death_callback",
        ),
        (F.replace("    return buf[at];", "    if (setjmp(env)) return -1;\n    return buf[at];"), "it adds setjmp"),
        (F.replace("    return buf[at];", "    signal(11, on_segv);\n    return buf[at];"), "it adds signal"),
        (F.replace("    return buf[at];", "    if (fork() == 0) return buf[at];\n    return -1;"), "it adds fork"),
    ],
)
def test_what_reaches_beyond_the_function_is_named(patched, why):
    assert outside_the_function(patched, F).startswith(why)


@pytest.mark.skipif(not REAL_PRIMEVUL.is_dir(), reason="the real PrimeVul sample is not here")
def test_no_real_fix_is_refused():
    """Every fixed function of the real sample, checked against each vulnerable function of its commit: the rule
    refuses none (a rule that refused real fixes would make their harnesses fail)."""
    pairs = 0
    for path in sorted(REAL_PRIMEVUL.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_commit: dict[str, list[dict]] = {}
        for row in rows:
            by_commit.setdefault(row["commit_id"], []).append(row)
        for group in by_commit.values():
            for vulnerable in (r for r in group if r["target"] == 1):
                for fixed in (r for r in group if r["target"] == 0):
                    assert outside_the_function(fixed["func"], vulnerable["func"]) is None, fixed["idx"]
                    pairs += 1
    assert pairs >= 20
