/* Harness for faad2 stszin (frontend/mp4read.c), CVE-2021-32272.
 * Stand-ins: mp4config_t as in frontend/mp4read.h (frame.data/ents/maxsize as declared there), the ERR_* codes,
 * and datain()/u32in() reading big-endian words from an in-memory atom body instead of the FILE *g_fin. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct
{
    uint32_t ctime, mtime;
    uint32_t samplerate;
    uint32_t samples;
    uint32_t channels;
    uint32_t bits;
    uint16_t buffersize;
    uint32_t bitratemax;
    uint32_t bitrateavg;
    uint32_t framesamples;
    struct
    {
        uint32_t *data;
        uint32_t ents;
        int current;
        int maxsize;
    } frame;
    struct
    {
        uint8_t buf[10];
        int size;
    } asc;
    uint32_t mdatofs;
    uint32_t mdatsize;
    struct {
        int size;
        uint8_t *data;
    } bitbuf;
    struct {
        int header;
        int tags;
    } verbose;
} mp4config_t;

static mp4config_t mp4config = { 0 };

enum {ERR_OK = 0, ERR_FAIL = -1, ERR_UNSUPPORTED = -2};

/* the input stream: an in-memory copy of the file from the atom body on */
static const uint8_t *g_in;
static size_t g_inlen, g_inpos;

static int datain(void *data, int size)
{
    if (g_inlen - g_inpos < (size_t)size)
        return ERR_FAIL;
    memcpy(data, g_in + g_inpos, size);
    g_inpos += size;
    return size;
}

static uint32_t u32in(void)
{
    uint8_t b[4] = {0, 0, 0, 0}; /* short read: 0 (the real one leaves the word unset) */
    datain(b, 4);
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

#include "function.c"

/* ---- driver ---- */

#define MAX_WORDS 1100

/* an stsz atom body: version/flags, sample size 0, entry count, then the entry sizes */
static int run_stsz(uint32_t ents, const uint32_t *sizes, int nsizes, int atom_size)
{
    uint32_t words[MAX_WORDS];
    int n = 0;
    words[n++] = 0;
    words[n++] = 0;
    words[n++] = ents;
    for (int i = 0; i < nsizes; i++) words[n++] = sizes[i];
    uint8_t *buf = malloc(4 * n); /* heap copy: reads past the atom are seen by ASan */
    for (int i = 0; i < n; i++) {
        buf[4 * i] = words[i] >> 24;
        buf[4 * i + 1] = words[i] >> 16;
        buf[4 * i + 2] = words[i] >> 8;
        buf[4 * i + 3] = words[i];
    }
    memset(&mp4config, 0, sizeof mp4config);
    g_in = buf;
    g_inlen = 4 * n;
    g_inpos = 0;
    int r = stszin(atom_size);
    free(buf);
    return r;
}

static void cleanup(void)
{
    free(mp4config.frame.data);
    mp4config.frame.data = NULL;
}

static int check_table(int r, int atom_size, uint32_t ents, const uint32_t *sizes, int maxsize)
{
    int bad = 0;
    if (r != atom_size) { fprintf(stderr, "return: got %d, want %d\n", r, atom_size); bad = 1; }
    if (mp4config.frame.ents != ents) { fprintf(stderr, "ents: got %u, want %u\n", mp4config.frame.ents, ents); bad = 1; }
    if (mp4config.frame.maxsize != maxsize) { fprintf(stderr, "maxsize: got %d, want %d\n", mp4config.frame.maxsize, maxsize); bad = 1; }
    if (!mp4config.frame.data) { fprintf(stderr, "no frame table\n"); return 1; }
    uint32_t ofs = 0;
    for (uint32_t i = 0; i <= ents; i++) {
        if (mp4config.frame.data[i] != ofs) {
            fprintf(stderr, "data[%u]: got %u, want %u\n", i, mp4config.frame.data[i], ofs);
            return 1;
        }
        if (i < ents) ofs += sizes[i];
    }
    return bad;
}

/* proof: entry count 0xffffffff (the count + 1 wraps to 0 in the allocation size) must be refused */
static int case_ents_wrap(void)
{
    static const uint32_t sizes[] = {100, 200, 300};
    int r = run_stsz(0xffffffffu, sizes, 3, 32);
    int bad = 0;
    if (r != ERR_FAIL) { fprintf(stderr, "return: got %d, want ERR_FAIL\n", r); bad = 1; }
    cleanup();
    return bad;
}

/* three frames: offsets table 0, 10, 30, 35 and the largest frame size */
static int case_three_frames(void)
{
    static const uint32_t sizes[] = {10, 20, 5};
    int r = run_stsz(3, sizes, 3, 32);
    int bad = check_table(r, 32, 3, sizes, 20);
    if (g_inpos != 24) { fprintf(stderr, "consumed %zu bytes, want 24\n", g_inpos); bad = 1; }
    cleanup();
    return bad;
}

/* no frames: a one-entry table holding offset 0 */
static int case_no_frames(void)
{
    int r = run_stsz(0, NULL, 0, 20);
    int bad = check_table(r, 20, 0, NULL, 0);
    cleanup();
    return bad;
}

/* a thousand frames of growing size */
static int case_many_frames(void)
{
    static uint32_t sizes[1000];
    for (int i = 0; i < 1000; i++) sizes[i] = 100 + (i * 7) % 50;
    int r = run_stsz(1000, sizes, 1000, 4012);
    int bad = check_table(r, 4012, 1000, sizes, 149);
    cleanup();
    return bad;
}

/* frame sizes whose running offset wraps past 2^32: refused */
static int case_offset_wraps(void)
{
    static const uint32_t sizes[] = {16, 0xfffffff8u, 16};
    int r = run_stsz(3, sizes, 3, 32);
    int bad = 0;
    if (r != ERR_FAIL) { fprintf(stderr, "return: got %d, want ERR_FAIL\n", r); bad = 1; }
    cleanup();
    return bad;
}

int main(int argc, char **argv)
{
    static const struct { const char *name; int (*run)(void); } cases[] = {
        {"ents_wrap", case_ents_wrap},
        {"three_frames", case_three_frames},
        {"no_frames", case_no_frames},
        {"many_frames", case_many_frames},
        {"offset_wraps", case_offset_wraps},
    };
    if (argc < 2) return 2;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (!strcmp(argv[1], cases[i].name)) return cases[i].run();
    return 2;
}
