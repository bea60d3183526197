#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WAV_OK 0
#define WAV_ERR_FORMAT (-1)
#define WAV_ERR_UNSUPPORTED (-2)
#define WAV_FORMAT_PCM 1

struct wav_info {
    uint16_t format;
    uint16_t channels;
    uint32_t sample_rate;
    uint32_t byte_rate;
    uint16_t block_align;
    uint16_t bits_per_sample;
    uint32_t data_size;     /* size of the data chunk, known before the fmt chunk is parsed */
    uint32_t frame_count;
    uint64_t duration_ms;
};

static uint16_t rd_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t rd_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

#include "function.c"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); return 1; } } while (0)

static void wr16(uint8_t *p, uint16_t v) { p[0] = v & 0xFF; p[1] = v >> 8; }
static void wr32(uint8_t *p, uint32_t v) { wr16(p, v & 0xFFFF); wr16(p + 2, v >> 16); }

/* parse a 16-byte fmt chunk (given to the function as a heap buffer of `size` bytes) */
static int parse(struct wav_info *info, uint32_t data_size, uint32_t size, uint16_t format, uint16_t channels,
                 uint32_t rate, uint16_t align, uint16_t bits)
{
    uint8_t *chunk = malloc(16);
    int rc;

    wr16(chunk, format);
    wr16(chunk + 2, channels);
    wr32(chunk + 4, rate);
    wr32(chunk + 8, rate * align);
    wr16(chunk + 12, align);
    wr16(chunk + 14, bits);
    memset(info, 0, sizeof(*info));
    info->data_size = data_size;
    rc = wav_parse_fmt(info, chunk, size);
    free(chunk);
    return rc;
}

static int zero_block_align(void)
{
    struct wav_info info;
    CHECK(parse(&info, 1000, 16, WAV_FORMAT_PCM, 2, 44100, 0, 16) == WAV_ERR_FORMAT);
    return 0;
}

static int pcm_stereo(void)
{
    struct wav_info info;
    CHECK(parse(&info, 176400, 16, WAV_FORMAT_PCM, 2, 44100, 4, 16) == WAV_OK);
    CHECK(info.format == WAV_FORMAT_PCM && info.channels == 2 && info.sample_rate == 44100);
    CHECK(info.byte_rate == 176400 && info.block_align == 4 && info.bits_per_sample == 16);
    CHECK(info.frame_count == 44100);
    CHECK(info.duration_ms == 1000);
    return 0;
}

static int pcm_mono_8bit(void)
{
    struct wav_info info;
    CHECK(parse(&info, 4000, 16, WAV_FORMAT_PCM, 1, 8000, 1, 8) == WAV_OK);
    CHECK(info.channels == 1 && info.bits_per_sample == 8);
    CHECK(info.frame_count == 4000);
    CHECK(info.duration_ms == 500);
    return 0;
}

static int short_chunk(void)
{
    struct wav_info info;
    CHECK(parse(&info, 1000, 14, WAV_FORMAT_PCM, 2, 44100, 4, 16) == WAV_ERR_FORMAT);
    return 0;
}

static int not_pcm(void)
{
    struct wav_info info;
    CHECK(parse(&info, 1000, 16, 3 /* IEEE float */, 2, 48000, 8, 32) == WAV_ERR_UNSUPPORTED);
    CHECK(info.format == 3 && info.channels == 2);
    return 0;
}

static int zero_channels(void)
{
    struct wav_info info;
    CHECK(parse(&info, 1000, 16, WAV_FORMAT_PCM, 0, 44100, 4, 16) == WAV_ERR_FORMAT);
    return 0;
}

static const struct { const char *name; int (*run)(void); } cases[] = {
    {"zero_block_align", zero_block_align},
    {"pcm_stereo", pcm_stereo},
    {"pcm_mono_8bit", pcm_mono_8bit},
    {"short_chunk", short_chunk},
    {"not_pcm", not_pcm},
    {"zero_channels", zero_channels},
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
