#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ipv4_hdr {
    uint8_t version;
    uint8_t tos;
    uint16_t total_len;
    uint8_t ttl;
    uint8_t protocol;
    uint32_t src;               /* network byte order, as copied from the packet */
    uint32_t dst;
    const uint8_t *options;     /* point into the packet */
    size_t options_len;
    const uint8_t *payload;
    size_t payload_len;
};

#include "function.c"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); return 1; } } while (0)

/* a packet of len captured bytes, on the heap so that a read past the capture is seen:
   version/ihl byte, total length, ttl 64, protocol 17 (UDP), 10.0.0.1 -> 192.168.1.2, the rest 0xAB */
static uint8_t *packet(uint8_t ver_ihl, uint16_t total_len, size_t len)
{
    uint8_t hdr[20] = {0, 0x10, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 192, 168, 1, 2};
    uint8_t *p = malloc(len);

    memset(p, 0xAB, len);
    hdr[0] = ver_ihl;
    hdr[2] = total_len >> 8;
    hdr[3] = total_len & 0xFF;
    memcpy(p, hdr, len < 20 ? len : 20);
    return p;
}

static int truncated_header(void)
{
    struct ipv4_hdr h;
    uint8_t *p = packet(0x45, 40, 4);
    int rc = ipv4_parse(p, 4, &h);

    free(p);
    CHECK(rc == -1);
    return 0;
}

static int plain_header(void)
{
    static const uint8_t src[4] = {10, 0, 0, 1}, dst[4] = {192, 168, 1, 2};
    struct ipv4_hdr h;
    uint8_t *p = packet(0x45, 28, 28);

    memset(&h, 0, sizeof(h));
    CHECK(ipv4_parse(p, 28, &h) == 0);
    CHECK(h.version == 4 && h.tos == 0x10 && h.total_len == 28);
    CHECK(h.ttl == 64 && h.protocol == 17);
    CHECK(memcmp(&h.src, src, 4) == 0 && memcmp(&h.dst, dst, 4) == 0);
    CHECK(h.options_len == 0);
    CHECK(h.payload == p + 20 && h.payload_len == 8);
    free(p);
    return 0;
}

static int with_options(void)
{
    struct ipv4_hdr h;
    /* ihl 6: 4 bytes of options; 40 bytes captured, total length 32 (ethernet padding after) */
    uint8_t *p = packet(0x46, 32, 40);

    memset(&h, 0, sizeof(h));
    CHECK(ipv4_parse(p, 40, &h) == 0);
    CHECK(h.version == 4 && h.total_len == 32);
    CHECK(h.options == p + 20 && h.options_len == 4);
    CHECK(h.payload == p + 24 && h.payload_len == 8);
    free(p);
    return 0;
}

static int not_ipv4(void)
{
    struct ipv4_hdr h;
    uint8_t *p = packet(0x65, 40, 40);
    int rc = ipv4_parse(p, 40, &h);

    free(p);
    CHECK(rc == -1);
    return 0;
}

static int short_ihl(void)
{
    struct ipv4_hdr h;
    uint8_t *p = packet(0x44, 40, 40);
    int rc = ipv4_parse(p, 40, &h);

    free(p);
    CHECK(rc == -1);
    return 0;
}

static int total_len_past_capture(void)
{
    struct ipv4_hdr h;
    uint8_t *p = packet(0x45, 1500, 60);
    int rc = ipv4_parse(p, 60, &h);

    free(p);
    CHECK(rc == -1);
    return 0;
}

static const struct { const char *name; int (*run)(void); } cases[] = {
    {"truncated_header", truncated_header},
    {"plain_header", plain_header},
    {"with_options", with_options},
    {"not_ipv4", not_ipv4},
    {"short_ihl", short_ihl},
    {"total_len_past_capture", total_len_past_capture},
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
