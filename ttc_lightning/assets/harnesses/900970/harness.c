#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PNG_OK 0
#define PNG_ERR_FORMAT (-1)
#define PNG_ERR_NOMEM (-2)
#define PNG_ERR_TRUNCATED (-3)
#define PNG_MAX_TEXT 1024

/* the rest of the file: reads come from an in-memory chunk body */
struct png_reader {
    const uint8_t *data;
    size_t len;
    size_t pos;
};

struct png_text {
    char *keyword;      /* owns the buffer: the caller frees keyword */
    char *text;         /* points into the keyword's buffer */
};

/* copies up to n bytes; fewer when the file ends first */
static size_t reader_read(struct png_reader *rd, void *dst, size_t n)
{
    size_t left = rd->len - rd->pos;

    if (n > left)
        n = left;
    memcpy(dst, rd->data + rd->pos, n);
    rd->pos += n;
    return n;
}

#include "function.c"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); return 1; } } while (0)

/* read a tEXt chunk declared as len bytes from a file holding the avail bytes of body */
static int read_chunk(const char *body, size_t avail, uint32_t len, struct png_text *out)
{
    uint8_t *data = malloc(avail ? avail : 1);
    struct png_reader rd = {data, avail, 0};
    int rc;

    memcpy(data, body, avail);
    out->keyword = NULL;
    out->text = NULL;
    rc = read_text_chunk(&rd, len, out);
    free(data);
    return rc;
}

static int empty_keyword(void)
{
    struct png_text t;
    CHECK(read_chunk("\0hello", 6, 6, &t) == PNG_ERR_FORMAT);
    CHECK(t.keyword == NULL);
    return 0;
}

static int keyword_and_text(void)
{
    struct png_text t;
    int ok;

    CHECK(read_chunk("Title\0A sunset", 14, 14, &t) == PNG_OK);
    CHECK(t.keyword != NULL && t.text != NULL);
    ok = strcmp(t.keyword, "Title") == 0 && strcmp(t.text, "A sunset") == 0;
    free(t.keyword);
    CHECK(ok);
    return 0;
}

static int empty_text(void)
{
    struct png_text t;
    int ok;

    CHECK(read_chunk("Author\0", 7, 7, &t) == PNG_OK);
    CHECK(t.keyword != NULL && t.text != NULL);
    ok = strcmp(t.keyword, "Author") == 0 && t.text[0] == '\0';
    free(t.keyword);
    CHECK(ok);
    return 0;
}

static int no_separator(void)
{
    struct png_text t;
    CHECK(read_chunk("Title", 5, 5, &t) == PNG_ERR_FORMAT);
    return 0;
}

static int truncated(void)
{
    struct png_text t;
    CHECK(read_chunk("Title\0A su", 10, 14, &t) == PNG_ERR_TRUNCATED);
    return 0;
}

static int too_long(void)
{
    struct png_text t;
    CHECK(read_chunk("Title\0x", 7, PNG_MAX_TEXT + 1, &t) == PNG_ERR_FORMAT);
    return 0;
}

static const struct { const char *name; int (*run)(void); } cases[] = {
    {"empty_keyword", empty_keyword},
    {"keyword_and_text", keyword_and_text},
    {"empty_text", empty_text},
    {"no_separator", no_separator},
    {"truncated", truncated},
    {"too_long", too_long},
};

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].run();
    return 2;
}
