// Harness for hhvm SimpleParser::handleBackslash (hphp/runtime/ext/json/JSON_parser.cpp,
// CVE-2020-1888). The function is a member written inline in struct SimpleParser, so the
// include sits inside a stand-in of that struct holding the two members it reads.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define UNLIKELY(x) __builtin_expect(!!(x), 0)

namespace {

int dehexchar(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - ('A' - 10);
  if (c >= 'a' && c <= 'f') return c - ('a' - 10);
  return -1;
}

struct SimpleParser {
  SimpleParser(const char* input, bool tsimplejson) : p(input), is_tsimplejson(tsimplejson) {}

#include "function.cpp"

  // The real parser relies on the NUL sentinel at input[length] ("Parser relies on sentinel
  // to avoid checks") and has no other bound on p.
  const char* p;
  bool is_tsimplejson;
};

}  // namespace

// ---- driver -----------------------------------------------------------------------------------

struct Outcome {
  bool ok;
  signed char out;
  long advanced;  // how far p moved past the backslash
};

// `after` is the JSON text that follows a backslash inside a string, up to the end of the input.
// It is copied into a heap buffer of exactly strlen+1 bytes (the sentinel NUL included), as
// json_decode's input string is, so ASan sees any read past the sentinel.
static Outcome escape(const char* after, bool tsimplejson) {
  size_t n = strlen(after);
  char* buf = static_cast<char*>(malloc(n + 1));
  memcpy(buf, after, n + 1);
  SimpleParser parser(buf, tsimplejson);
  signed char out = 0x55;
  Outcome o;
  o.ok = parser.handleBackslash(out);
  o.out = out;
  o.advanced = parser.p - buf;
  free(buf);
  return o;
}

static int want(const char* after, bool tsimplejson, signed char expected, long advanced) {
  Outcome o = escape(after, tsimplejson);
  if (!o.ok || o.out != expected || o.advanced != advanced) {
    fprintf(stderr, "\\%s: ok=%d out=%d advanced=%ld\n", after, o.ok, o.out, o.advanced);
    return 1;
  }
  return 0;
}

static int reject(const char* after, bool tsimplejson) {
  Outcome o = escape(after, tsimplejson);
  if (o.ok) {
    fprintf(stderr, "\\%s accepted\n", after);
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* c = argv[1];
  if (!strcmp(c, "tsimplejson_u_at_end")) {
    // json_decode('"\u', tsimplejson mode): the input ends right after "\u"
    return reject("u", true);
  }
  if (!strcmp(c, "simple_escapes")) {
    int r = 0;
    r |= want("\"x", false, '"', 1);
    r |= want("\\x", false, '\\', 1);
    r |= want("/x", false, '/', 1);
    r |= want("b", false, '\b', 1);
    r |= want("f", false, '\f', 1);
    r |= want("n\"", false, '\n', 1);
    r |= want("r", false, '\r', 1);
    r |= want("t", true, '\t', 1);
    return r;
  }
  if (!strcmp(c, "unicode_ascii")) {
    return want("u0041\"", false, 'A', 5) | want("u007f", false, 0x7f, 5) |
           want("u004a", false, 'J', 5);
  }
  if (!strcmp(c, "unicode_rejects")) {
    // beyond ASCII, non-hex digit, and a string that ends inside the four digits
    return reject("u00e9", false) | reject("u00g1", false) | reject("u00", false);
  }
  if (!strcmp(c, "tsimplejson_unicode")) {
    return want("u0041\"", true, 'A', 5) | want("u00e9", true, (signed char)0xe9, 5) |
           reject("u0141", true) | reject("u00z1", true);
  }
  if (!strcmp(c, "invalid_escapes")) {
    return reject("x", false) | reject("", false) | reject("a", true);
  }
  return 2;
}
