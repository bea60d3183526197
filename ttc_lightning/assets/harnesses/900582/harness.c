/* Harness for confkit keyfile_load (CVE-0000-0006, CWE-401). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#define KF_MAX 8

struct keyfile {
    int n;
    char keys[KF_MAX][32];
    char values[KF_MAX][512];
};

/* Removes the trailing newline getline left (n is the length getline returned). */
static void strip_newline(char *line, ssize_t n)
{
    if (n > 0 && line[n - 1] == '\n')
        line[n - 1] = '\0';
}

/* Parses "key=value"; -1 for a line without '=' or with an empty or too long key or value. */
static int keyfile_parse_line(struct keyfile *kf, const char *line)
{
    const char *eq = strchr(line, '=');
    if (eq == NULL || eq == line || kf->n == KF_MAX)
        return -1;
    size_t klen = (size_t)(eq - line), vlen = strlen(eq + 1);
    if (klen >= sizeof kf->keys[0] || vlen >= sizeof kf->values[0])
        return -1;
    memcpy(kf->keys[kf->n], line, klen);
    kf->keys[kf->n][klen] = '\0';
    memcpy(kf->values[kf->n], eq + 1, vlen + 1);
    kf->n++;
    return 0;
}

/* fopen stand-in: named in-memory files (no file system); ENOENT for any other name.
 * getline and fclose on the stream are the real libc ones. */
static const char *fake_files[][2] = {
    {"/etc/app/good.conf", "name=demo\nport=8080\nmode=fast\n"},
    {"/etc/app/comments.conf", "# a comment\n\nname=demo\n#port=1\n\n\nport=9090\n"},
    {"/etc/app/nonl.conf", "name=demo\nport=7070"},
    {"/etc/app/bad.conf", "name=demo\nthis line has no equals sign\nport=8080\n"},
    {"/etc/app/long.conf", NULL}, /* filled in by case_long_line */
};
static FILE *fake_fopen(const char *path, const char *mode)
{
    for (size_t i = 0; i < sizeof fake_files / sizeof fake_files[0]; i++)
        if (fake_files[i][1] && strcmp(path, fake_files[i][0]) == 0)
            return fmemopen((void *)fake_files[i][1], strlen(fake_files[i][1]), mode);
    errno = ENOENT;
    return NULL;
}
#define fopen fake_fopen

#include "function.c"

static int has(const struct keyfile *kf, int i, const char *k, const char *v)
{
    return i < kf->n && strcmp(kf->keys[i], k) == 0 && strcmp(kf->values[i], v) == 0;
}

static int case_syntax_error(void)
{
    static struct keyfile kf;
    int rc = keyfile_load(&kf, "/etc/app/bad.conf");
    return !(rc == -EINVAL && kf.n == 1 && has(&kf, 0, "name", "demo"));
}

static int case_load_pairs(void)
{
    static struct keyfile kf;
    int rc = keyfile_load(&kf, "/etc/app/good.conf");
    return !(rc == 0 && kf.n == 3 && has(&kf, 0, "name", "demo") && has(&kf, 1, "port", "8080") &&
             has(&kf, 2, "mode", "fast"));
}

static int case_comments_and_blanks(void)
{
    static struct keyfile kf;
    int rc = keyfile_load(&kf, "/etc/app/comments.conf");
    return !(rc == 0 && kf.n == 2 && has(&kf, 0, "name", "demo") && has(&kf, 1, "port", "9090"));
}

static int case_no_final_newline(void)
{
    static struct keyfile kf;
    int rc = keyfile_load(&kf, "/etc/app/nonl.conf");
    return !(rc == 0 && kf.n == 2 && has(&kf, 1, "port", "7070"));
}

static int case_long_line(void)
{
    /* a 400-byte value makes getline grow its buffer */
    static char text[600];
    static char value[401];
    static struct keyfile kf;
    memset(value, 'v', 400);
    snprintf(text, sizeof text, "a=1\nbig=%s\nz=2\n", value);
    fake_files[4][1] = text;
    int rc = keyfile_load(&kf, "/etc/app/long.conf");
    return !(rc == 0 && kf.n == 3 && has(&kf, 1, "big", value) && has(&kf, 2, "z", "2"));
}

static int case_missing_file(void)
{
    static struct keyfile kf;
    int rc = keyfile_load(&kf, "/etc/app/absent.conf");
    return !(rc == -ENOENT && kf.n == 0);
}

int main(int argc, char **argv)
{
    static const struct { const char *name; int (*fn)(void); } cases[] = {
        {"syntax_error", case_syntax_error},
        {"load_pairs", case_load_pairs},
        {"comments_and_blanks", case_comments_and_blanks},
        {"no_final_newline", case_no_final_newline},
        {"long_line", case_long_line},
        {"missing_file", case_missing_file},
    };
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].fn();
    fprintf(stderr, "unknown case: %s\n", argv[1]);
    return 2;
}
