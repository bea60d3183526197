#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Stand-in cookie jar: a fixed number of slots holding copies of name and value.
   cookie_jar_set returns -1 when the jar is full, 0 otherwise (cookie_parse then stops). */
#define JAR_CAP 4

struct cookie_jar {
    int n;
    char *name[JAR_CAP];
    char *value[JAR_CAP];
};

static int cookie_jar_set(struct cookie_jar *jar, const char *name, const char *value)
{
    if (jar->n == JAR_CAP)
        return -1;
    jar->name[jar->n] = strdup(name);
    jar->value[jar->n] = strdup(value);
    jar->n++;
    return 0;
}

static void jar_free(struct cookie_jar *jar)
{
    for (int i = 0; i < jar->n; i++) {
        free(jar->name[i]);
        free(jar->value[i]);
    }
}

#include "function.c"

static int has(const struct cookie_jar *jar, int i, const char *name, const char *value)
{
    if (i >= jar->n || strcmp(jar->name[i], name) != 0 || strcmp(jar->value[i], value) != 0) {
        fprintf(stderr, "cookie %d: expected %s=%s\n", i, name, value);
        return 0;
    }
    return 1;
}

static int run(const char *header, int want_count, int want_n)
{
    struct cookie_jar jar = {0};
    int rc = cookie_parse(&jar, header);
    int ok = rc == want_count && jar.n == want_n;

    if (!ok)
        fprintf(stderr, "cookie_parse(\"%s\") = %d (jar %d), expected %d (jar %d)\n", header, rc, jar.n,
                want_count, want_n);
    jar_free(&jar);
    return ok;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    struct cookie_jar jar = {0};
    int ok;

    if (strcmp(c, "pair_without_equals") == 0) {
        /* "secure" has no '=': it must be skipped, the pairs around it kept */
        int rc = cookie_parse(&jar, "a=1; secure; b=2");
        ok = rc == 2 && has(&jar, 0, "a", "1") && has(&jar, 1, "b", "2");
    } else if (strcmp(c, "single_pair") == 0) {
        int rc = cookie_parse(&jar, "sid=abc123");
        ok = rc == 1 && jar.n == 1 && has(&jar, 0, "sid", "abc123");
    } else if (strcmp(c, "several_pairs") == 0) {
        /* leading spaces of names are stripped */
        int rc = cookie_parse(&jar, "sid=abc;  lang=en; theme=dark");
        ok = rc == 3 && has(&jar, 0, "sid", "abc") && has(&jar, 1, "lang", "en") && has(&jar, 2, "theme", "dark");
    } else if (strcmp(c, "value_with_equals") == 0) {
        /* only the first '=' splits name from value; an empty value is kept */
        int rc = cookie_parse(&jar, "tok=a=b==; e=");
        ok = rc == 2 && has(&jar, 0, "tok", "a=b==") && has(&jar, 1, "e", "");
    } else if (strcmp(c, "jar_full") == 0) {
        /* the jar refuses the fifth cookie: parsing stops and counts the four stored */
        return run("a=1; b=2; c=3; d=4; e=5; f=6", 4, 4) ? 0 : 1;
    } else if (strcmp(c, "empty_header") == 0) {
        return run("", 0, 0) ? 0 : 1;
    } else {
        return 2;
    }
    if (!ok)
        fprintf(stderr, "case %s failed (jar holds %d)\n", c, jar.n);
    jar_free(&jar);
    return ok ? 0 : 1;
}
