"""Write the shipped PrimeVul-format sample, `ttc_lightning/assets/primevul_sample/`, from the C source below.

The functions, fixes, projects and CVE ids are made up for this project (CVE ids are `CVE-0000-NNNN`, so nobody
mistakes them for real ones); the format is PrimeVul v0.1's, field for field. Output is deterministic:

    python scripts/make_primevul_sample.py [OUT_DIR]
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "ttc_lightning" / "assets" / "primevul_sample"
URL_ROOT = "https://git.example.org"


@dataclass(frozen=True)
class Fix:
    """One fictional vulnerability fix: the vulnerable function, the patch that fixes it, its commit's metadata."""

    split: str
    project: str
    file_name: str | None  # None: written as the release's "None" file name with a null file_hash
    cwe: str
    cve_desc: str
    commit_message: str
    vulnerable: str
    patch: tuple[tuple[str, str], ...]  # (old, new) text replacements, each old matching exactly once
    benign: tuple[str, ...] = ()  # unchanged functions of the same file, in the unpaired files only


FIXES = [
    Fix(
        split="train",
        project="tinytlv",
        file_name="tlv.c",
        cwe="CWE-787",
        cve_desc="tlv_read_string in tlv.c in tinytlv before 1.4.2 copies a string value into the caller's buffer "
        "without checking its length, which allows remote attackers to cause a heap-based buffer overflow via a "
        "crafted TLV record.",
        commit_message="tlv: reject string values longer than the output buffer",
        vulnerable=r"""int tlv_read_string(const uint8_t *buf, size_t buf_len, size_t *offset,
                    char *out, size_t out_size)
{
    size_t pos = *offset;
    uint8_t type;
    uint16_t len;

    if (pos > buf_len || buf_len - pos < 3)
        return TLV_ERR_SHORT;
    type = buf[pos];
    len = (uint16_t)(buf[pos + 1] << 8 | buf[pos + 2]);
    pos += 3;
    if (type != TLV_TYPE_STRING)
        return TLV_ERR_TYPE;
    if (buf_len - pos < len)
        return TLV_ERR_SHORT;
    memcpy(out, buf + pos, len);
    out[len] = '\0';
    *offset = pos + len;
    return TLV_OK;
}""",
        patch=(
            (
                "        return TLV_ERR_SHORT;\n    memcpy(",
                "        return TLV_ERR_SHORT;\n    if (len >= out_size)\n        return TLV_ERR_TOO_LONG;\n"
                "    memcpy(",
            ),
        ),
        benign=(
            r"""int tlv_write_u16(uint8_t *buf, size_t buf_len, size_t *offset,
                  uint8_t type, uint16_t value)
{
    size_t pos = *offset;

    if (pos > buf_len || buf_len - pos < 5)
        return TLV_ERR_SHORT;
    buf[pos] = type;
    buf[pos + 1] = 0;
    buf[pos + 2] = 2;
    buf[pos + 3] = (uint8_t)(value >> 8);
    buf[pos + 4] = (uint8_t)value;
    *offset = pos + 5;
    return TLV_OK;
}""",
        ),
    ),
    Fix(
        split="train",
        project="pktparse",
        file_name="tcp.c",
        cwe="CWE-125",
        cve_desc="An out-of-bounds read in find_option in tcp.c in pktparse 0.9.x allows remote attackers to read "
        "one byte past the end of the options buffer via a TCP segment whose options end with a kind byte.",
        commit_message="tcp: check that an option's length byte is inside the options area",
        vulnerable=r"""static int find_option(const uint8_t *opts, size_t opts_len, uint8_t kind,
                       const uint8_t **value, uint8_t *value_len)
{
    size_t i = 0;

    while (i < opts_len) {
        uint8_t opt = opts[i];
        uint8_t len;

        if (opt == OPT_END)
            break;
        if (opt == OPT_NOP) {
            i++;
            continue;
        }
        len = opts[i + 1];
        if (len < 2 || i + len > opts_len)
            return -1;
        if (opt == kind) {
            *value = opts + i + 2;
            *value_len = len - 2;
            return 0;
        }
        i += len;
    }
    return -1;
}""",
        patch=(
            (
                "        len = opts[i + 1];",
                "        if (i + 1 >= opts_len)\n            return -1;\n        len = opts[i + 1];",
            ),
        ),
        benign=(
            r"""uint16_t inet_checksum(const uint8_t *data, size_t len)
{
    uint32_t sum = 0;
    size_t i;

    for (i = 0; i + 1 < len; i += 2)
        sum += (uint32_t)(data[i] << 8 | data[i + 1]);
    if (len & 1)
        sum += (uint32_t)data[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)~sum;
}""",
        ),
    ),
    Fix(
        split="train",
        project="netcfg",
        file_name="config.c",
        cwe="CWE-476",
        cve_desc="netcfg_apply_mtu in config.c in netcfg before 2.1.0 dereferences a NULL pointer when the "
        "configuration names an interface that does not exist, which allows local users to crash netcfgd.",
        commit_message="config: return -ENODEV for an unknown interface instead of crashing",
        vulnerable=r"""int netcfg_apply_mtu(struct netcfg *cfg, const char *ifname)
{
    struct netcfg_iface *iface;
    const char *value;
    long mtu;
    char *end;

    iface = netcfg_find_iface(cfg, ifname);
    value = netcfg_get(iface->section, "mtu");
    if (value == NULL)
        return 0;
    errno = 0;
    mtu = strtol(value, &end, 10);
    if (errno != 0 || *end != '\0' || mtu < 68 || mtu > 65535) {
        netcfg_log(cfg, LOG_WARNING, "%s: invalid mtu '%s'", ifname, value);
        return -EINVAL;
    }
    iface->mtu = (int)mtu;
    return 0;
}""",
        patch=(
            (
                "    iface = netcfg_find_iface(cfg, ifname);\n",
                "    iface = netcfg_find_iface(cfg, ifname);\n    if (iface == NULL)\n        return -ENODEV;\n",
            ),
        ),
        benign=(
            r"""struct netcfg_iface *netcfg_find_iface(struct netcfg *cfg, const char *ifname)
{
    size_t i;

    if (ifname == NULL)
        return NULL;
    for (i = 0; i < cfg->niface; i++) {
        if (strcmp(cfg->ifaces[i].name, ifname) == 0)
            return &cfg->ifaces[i];
    }
    return NULL;
}""",
        ),
    ),
    Fix(
        split="train",
        project="sessiond",
        file_name="session.c",
        cwe="CWE-416",
        cve_desc="A use-after-free in session_close in session.c in sessiond 3.2 allows remote attackers to cause a "
        "denial of service or possibly have other impact by closing a connection while debug logging is enabled.",
        commit_message="session: log before freeing the session",
        vulnerable=r"""void session_close(struct server *srv, struct session *s, int reason)
{
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
    list_del(&s->node);
    srv->nsessions--;
    buffer_free(s->inbuf);
    buffer_free(s->outbuf);
    free(s);
    log_info(srv->log, "session %u closed (%s), %u active",
             s->id, close_reason_str(reason), srv->nsessions);
}""",
        patch=(
            (
                '    free(s);\n    log_info(srv->log, "session %u closed (%s), %u active",\n'
                "             s->id, close_reason_str(reason), srv->nsessions);\n",
                '    log_info(srv->log, "session %u closed (%s), %u active",\n'
                "             s->id, close_reason_str(reason), srv->nsessions);\n    free(s);\n",
            ),
        ),
        benign=(
            r"""int buffer_reserve(struct buffer *b, size_t extra)
{
    size_t need, cap;
    char *data;

    if (extra > SIZE_MAX - b->len)
        return -ENOMEM;
    need = b->len + extra;
    if (need <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    data = realloc(b->data, cap);
    if (data == NULL)
        return -ENOMEM;
    b->data = data;
    b->cap = cap;
    return 0;
}""",
        ),
    ),
    Fix(
        split="train",
        project="kvstore",
        file_name="batch.c",
        cwe="CWE-190",
        cve_desc="An integer overflow in batch_decode in batch.c in kvstore before 0.7.3 allows remote attackers to "
        "cause a heap-based buffer overflow via a batch request with a large item count.",
        commit_message="batch: bound the item count before computing the allocation size",
        vulnerable=r"""struct item *batch_decode(const uint8_t *buf, size_t len, uint32_t *count_out)
{
    struct item *items;
    uint32_t count, i;
    unsigned int nbytes;
    size_t pos = 4;

    if (len < 4)
        return NULL;
    count = read_be32(buf);
    nbytes = count * sizeof(struct item);
    items = malloc(nbytes);
    if (items == NULL)
        return NULL;
    for (i = 0; i < count; i++) {
        if (len - pos < ITEM_WIRE_SIZE) {
            free(items);
            return NULL;
        }
        items[i].key = read_be32(buf + pos);
        items[i].flags = read_be16(buf + pos + 4);
        items[i].value = read_be64(buf + pos + 6);
        pos += ITEM_WIRE_SIZE;
    }
    *count_out = count;
    return items;
}""",
        patch=(
            (
                "    count = read_be32(buf);\n",
                "    count = read_be32(buf);\n    if (count > (len - 4) / ITEM_WIRE_SIZE)\n        return NULL;\n",
            ),
        ),
    ),
    Fix(
        split="train",
        project="confkit",
        file_name="keyfile.c",
        cwe="CWE-401",
        cve_desc="A memory leak in keyfile_load in keyfile.c in confkit 1.x allows attackers who can write "
        "configuration files to exhaust memory of a long-running service by repeatedly triggering a reload of a "
        "file with a syntax error.",
        commit_message="keyfile: free the line buffer on the syntax error path",
        vulnerable=r"""int keyfile_load(struct keyfile *kf, const char *path)
{
    FILE *fp;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int lineno = 0;

    fp = fopen(path, "r");
    if (fp == NULL)
        return -errno;
    while ((n = getline(&line, &cap, fp)) != -1) {
        lineno++;
        strip_newline(line, n);
        if (line[0] == '#' || line[0] == '\0')
            continue;
        if (keyfile_parse_line(kf, line) < 0) {
            fprintf(stderr, "%s:%d: syntax error\n", path, lineno);
            fclose(fp);
            return -EINVAL;
        }
    }
    free(line);
    fclose(fp);
    return 0;
}""",
        patch=(
            (
                "            fclose(fp);\n            return -EINVAL;",
                "            free(line);\n            fclose(fp);\n            return -EINVAL;",
            ),
        ),
    ),
    Fix(
        split="train",
        project="wavkit",
        file_name="wav.c",
        cwe="CWE-369",
        cve_desc="wav_parse_fmt in wav.c in wavkit before 0.5.1 divides by the block alignment read from the file, "
        "which allows remote attackers to cause a denial of service (crash) via a WAV file whose fmt chunk has a "
        "zero block_align.",
        commit_message="wav: reject fmt chunks with zero channels, rate or block alignment",
        vulnerable=r"""int wav_parse_fmt(struct wav_info *info, const uint8_t *chunk, uint32_t size)
{
    if (size < 16)
        return WAV_ERR_FORMAT;
    info->format = rd_le16(chunk);
    info->channels = rd_le16(chunk + 2);
    info->sample_rate = rd_le32(chunk + 4);
    info->byte_rate = rd_le32(chunk + 8);
    info->block_align = rd_le16(chunk + 12);
    info->bits_per_sample = rd_le16(chunk + 14);
    if (info->format != WAV_FORMAT_PCM)
        return WAV_ERR_UNSUPPORTED;
    info->frame_count = info->data_size / info->block_align;
    info->duration_ms = (uint64_t)info->frame_count * 1000 / info->sample_rate;
    return WAV_OK;
}""",
        patch=(
            (
                "    if (info->format != WAV_FORMAT_PCM)",
                "    if (info->channels == 0 || info->block_align == 0 || info->sample_rate == 0)\n"
                "        return WAV_ERR_FORMAT;\n    if (info->format != WAV_FORMAT_PCM)",
            ),
        ),
        benign=(
            r"""const uint8_t *wav_find_chunk(const uint8_t *buf, size_t len, const char id[4],
                              uint32_t *size_out)
{
    size_t pos = 12;

    while (pos <= len && len - pos >= 8) {
        uint32_t size = rd_le32(buf + pos + 4);

        if (size > len - pos - 8)
            return NULL;
        if (memcmp(buf + pos, id, 4) == 0) {
            *size_out = size;
            return buf + pos + 8;
        }
        pos += 8 + (size_t)size + (size & 1);
    }
    return NULL;
}""",
        ),
    ),
    Fix(
        split="train",
        project="minidns",
        file_name="name.c",
        cwe="CWE-835",
        cve_desc="dns_skip_name in name.c in minidns before 1.3.0 follows compression pointers without a limit, "
        "which allows remote attackers to cause a denial of service (infinite loop) via a DNS response containing "
        "a pointer to itself.",
        commit_message="name: limit the number of compression pointers followed",
        vulnerable=r"""static int dns_skip_name(const uint8_t *msg, size_t msg_len, size_t offset)
{
    size_t pos = offset;
    size_t end = 0;
    int jumped = 0;

    for (;;) {
        uint8_t label;

        if (pos >= msg_len)
            return -1;
        label = msg[pos];
        if (label == 0) {
            pos++;
            break;
        }
        if ((label & 0xC0) == 0xC0) {
            if (pos + 1 >= msg_len)
                return -1;
            if (!jumped)
                end = pos + 2;
            pos = ((size_t)(label & 0x3F) << 8) | msg[pos + 1];
            jumped = 1;
            continue;
        }
        pos += (size_t)label + 1;
    }
    return (int)(jumped ? end : pos);
}""",
        patch=(
            ("    int jumped = 0;\n", "    int jumped = 0;\n    int hops = 0;\n"),
            (
                "            if (pos + 1 >= msg_len)\n                return -1;\n",
                "            if (pos + 1 >= msg_len || ++hops > DNS_MAX_POINTERS)\n                return -1;\n",
            ),
        ),
        benign=(
            r"""int dns_read_header(const uint8_t *msg, size_t len, struct dns_header *h)
{
    if (len < DNS_HEADER_SIZE)
        return -1;
    h->id = (uint16_t)(msg[0] << 8 | msg[1]);
    h->flags = (uint16_t)(msg[2] << 8 | msg[3]);
    h->qdcount = (uint16_t)(msg[4] << 8 | msg[5]);
    h->ancount = (uint16_t)(msg[6] << 8 | msg[7]);
    h->nscount = (uint16_t)(msg[8] << 8 | msg[9]);
    h->arcount = (uint16_t)(msg[10] << 8 | msg[11]);
    if (h->flags & DNS_FLAG_TC)
        return 1;
    return 0;
}""",
        ),
    ),
    Fix(
        split="train",
        project="logd",
        file_name="relay.c",
        cwe="CWE-134",
        cve_desc="relay_message in relay.c in logd 2.x passes the received log message as the format string of "
        "syslog and fprintf, which allows remote attackers to read or write process memory via format specifiers "
        "in a log message.",
        commit_message="relay: never use message text as a format string",
        vulnerable=r"""static void relay_message(struct relay *r, const struct log_msg *msg)
{
    char line[1024];
    int n;

    n = snprintf(line, sizeof(line), "<%d>%s %s: ", msg->priority,
                 msg->timestamp, msg->tag);
    if (n < 0 || (size_t)n >= sizeof(line))
        return;
    strncat(line, msg->text, sizeof(line) - (size_t)n - 1);
    if (r->use_syslog) {
        syslog(msg->priority, line);
        return;
    }
    if (fprintf(r->out, line) < 0 || fputc('\n', r->out) == EOF)
        r->errors++;
}""",
        patch=(
            ("syslog(msg->priority, line);", 'syslog(msg->priority, "%s", line);'),
            (
                "if (fprintf(r->out, line) < 0 || fputc('\\n', r->out) == EOF)",
                'if (fprintf(r->out, "%s\\n", line) < 0)',
            ),
        ),
        benign=(
            r"""static int parse_priority(const char *s, int *prio, const char **rest)
{
    int value = 0;
    int digits = 0;

    if (*s != '<')
        return -1;
    s++;
    while (*s >= '0' && *s <= '9' && digits < 3) {
        value = value * 10 + (*s - '0');
        s++;
        digits++;
    }
    if (digits == 0 || *s != '>' || value > 191)
        return -1;
    *prio = value;
    *rest = s + 1;
    return 0;
}""",
        ),
    ),
    Fix(
        split="train",
        project="imgcodec",
        file_name="png_text.c",
        cwe="CWE-415",
        cve_desc="A double free in read_text_chunk in png_text.c in imgcodec before 0.12.0 allows remote attackers "
        "to cause a denial of service or possibly execute arbitrary code via a PNG tEXt chunk without a keyword.",
        commit_message="png: free the tEXt buffer once on the error path",
        vulnerable=r"""static int read_text_chunk(struct png_reader *rd, uint32_t len,
                           struct png_text *out)
{
    char *data;
    char *sep;

    if (len > PNG_MAX_TEXT)
        return PNG_ERR_FORMAT;
    data = malloc(len + 1);
    if (data == NULL)
        return PNG_ERR_NOMEM;
    if (reader_read(rd, data, len) != len) {
        free(data);
        return PNG_ERR_TRUNCATED;
    }
    data[len] = '\0';
    sep = memchr(data, '\0', len);
    if (sep == NULL || sep == data) {
        free(data);
        goto fail;
    }
    out->keyword = data;
    out->text = sep + 1;
    return PNG_OK;
fail:
    free(data);
    return PNG_ERR_FORMAT;
}""",
        patch=(
            (
                "    if (sep == NULL || sep == data) {\n        free(data);\n        goto fail;\n    }",
                "    if (sep == NULL || sep == data)\n        goto fail;",
            ),
        ),
        benign=(
            r"""uint32_t png_crc(uint32_t crc, const uint8_t *buf, size_t len)
{
    size_t i;
    int k;

    crc = ~crc;
    for (i = 0; i < len; i++) {
        crc ^= buf[i];
        for (k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}""",
        ),
    ),
    Fix(
        split="train",
        project="minihttpd",
        file_name="request.c",
        cwe="CWE-787",
        cve_desc="A stack-based buffer overflow in http_parse_host in request.c in minihttpd before 0.4.7 allows "
        "remote attackers to execute arbitrary code via a long Host header.",
        commit_message="request: reject Host headers longer than 255 bytes",
        vulnerable=r"""int http_parse_host(struct http_request *req, const char *header)
{
    char host[256];
    const char *colon;
    size_t len;

    while (*header == ' ' || *header == '\t')
        header++;
    colon = strchr(header, ':');
    len = colon ? (size_t)(colon - header) : strlen(header);
    if (len == 0)
        return HTTP_BAD_REQUEST;
    memcpy(host, header, len);
    host[len] = '\0';
    if (colon != NULL) {
        req->port = parse_port(colon + 1);
        if (req->port < 0)
            return HTTP_BAD_REQUEST;
    }
    req->host = strdup(host);
    return req->host ? 0 : HTTP_INTERNAL_ERROR;
}""",
        patch=(("    if (len == 0)\n", "    if (len == 0 || len >= sizeof(host))\n"),),
    ),
    Fix(
        split="train",
        project="pktparse",
        file_name="ipv4.c",
        cwe="CWE-125",
        cve_desc="ipv4_parse in ipv4.c in pktparse 0.9.x reads the IPv4 header before checking the captured length, "
        "which allows remote attackers to cause an out-of-bounds read via a truncated packet.",
        commit_message="ipv4: check the captured length covers the header",
        vulnerable=r"""int ipv4_parse(const uint8_t *pkt, size_t len, struct ipv4_hdr *hdr)
{
    size_t ihl;

    if (len < 1)
        return -1;
    hdr->version = pkt[0] >> 4;
    ihl = (size_t)(pkt[0] & 0x0F) * 4;
    if (hdr->version != 4 || ihl < 20)
        return -1;
    hdr->tos = pkt[1];
    hdr->total_len = (uint16_t)(pkt[2] << 8 | pkt[3]);
    hdr->ttl = pkt[8];
    hdr->protocol = pkt[9];
    memcpy(&hdr->src, pkt + 12, 4);
    memcpy(&hdr->dst, pkt + 16, 4);
    if (hdr->total_len < ihl || hdr->total_len > len)
        return -1;
    hdr->options = pkt + 20;
    hdr->options_len = ihl - 20;
    hdr->payload = pkt + ihl;
    hdr->payload_len = hdr->total_len - ihl;
    return 0;
}""",
        patch=(("    if (hdr->version != 4 || ihl < 20)\n", "    if (hdr->version != 4 || ihl < 20 || len < ihl)\n"),),
    ),
    Fix(
        split="valid",
        project="minihttpd",
        file_name="cookie.c",
        cwe="CWE-476",
        cve_desc="cookie_parse in cookie.c in minihttpd before 0.4.9 dereferences a NULL pointer when a Cookie "
        "header contains a pair without '=', which allows remote attackers to crash the server.",
        commit_message="cookie: skip cookie pairs without '='",
        vulnerable=r"""int cookie_parse(struct cookie_jar *jar, const char *header)
{
    char *copy, *token, *saveptr = NULL;
    int count = 0;

    copy = strdup(header);
    if (copy == NULL)
        return -ENOMEM;
    for (token = strtok_r(copy, ";", &saveptr); token != NULL;
         token = strtok_r(NULL, ";", &saveptr)) {
        char *eq = strchr(token, '=');

        *eq = '\0';
        while (*token == ' ')
            token++;
        if (cookie_jar_set(jar, token, eq + 1) < 0)
            break;
        count++;
    }
    free(copy);
    return count;
}""",
        patch=(("        *eq = '\\0';", "        if (eq == NULL)\n            continue;\n        *eq = '\\0';"),),
        benign=(
            r"""enum http_method http_method_from_string(const char *s, size_t len)
{
    static const struct {
        const char *name;
        enum http_method method;
    } table[] = {
        { "GET", HTTP_GET }, { "HEAD", HTTP_HEAD }, { "POST", HTTP_POST },
        { "PUT", HTTP_PUT }, { "DELETE", HTTP_DELETE },
    };
    size_t i;

    for (i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        if (strlen(table[i].name) == len && memcmp(table[i].name, s, len) == 0)
            return table[i].method;
    }
    return HTTP_UNKNOWN;
}""",
        ),
    ),
    Fix(
        split="valid",
        project="imgcodec",
        file_name=None,
        cwe="CWE-190",
        cve_desc="An integer overflow in bmp_alloc_pixels in imgcodec before 0.12.2 allows remote attackers to cause "
        "a heap-based buffer overflow via a BMP image with large width and height.",
        commit_message="bmp: cap image dimensions so the pixel buffer size cannot wrap",
        vulnerable=r"""uint8_t *bmp_alloc_pixels(const struct bmp_header *h, size_t *size_out)
{
    uint32_t stride, size;
    uint8_t *pixels;

    if (h->width == 0 || h->height == 0)
        return NULL;
    if (h->bpp != 8 && h->bpp != 24 && h->bpp != 32)
        return NULL;
    stride = (h->width * h->bpp + 31) / 32 * 4;
    size = stride * h->height;
    pixels = malloc(size);
    if (pixels == NULL)
        return NULL;
    *size_out = size;
    return pixels;
}""",
        patch=(
            (
                "    if (h->bpp != 8",
                "    if (h->width > BMP_MAX_DIM || h->height > BMP_MAX_DIM)\n        return NULL;\n    if (h->bpp != 8",
            ),
        ),
        benign=(
            r"""int bmp_read_header(const uint8_t *buf, size_t len, struct bmp_header *h)
{
    if (len < BMP_HEADER_SIZE || buf[0] != 'B' || buf[1] != 'M')
        return -1;
    h->file_size = rd_le32(buf + 2);
    h->data_offset = rd_le32(buf + 10);
    h->width = rd_le32(buf + 18);
    h->height = rd_le32(buf + 22);
    h->bpp = rd_le16(buf + 28);
    h->compression = rd_le32(buf + 30);
    if (h->data_offset < BMP_HEADER_SIZE || h->data_offset > len)
        return -1;
    return 0;
}""",
        ),
    ),
    Fix(
        split="valid",
        project="kvstore",
        file_name="page.c",
        cwe="CWE-617",
        cve_desc="page_read_slot in page.c in kvstore before 0.7.5 asserts that slot offsets read from disk are in "
        "range, which allows attackers who can modify a database file to cause a denial of service (abort).",
        commit_message="page: report corrupted slot offsets as I/O errors instead of asserting",
        vulnerable=r"""int page_read_slot(const struct page *pg, unsigned int slot,
                   struct slot_view *out)
{
    uint16_t off, len;

    assert(slot < pg->hdr.nslots);
    off = pg->slots[slot].offset;
    len = pg->slots[slot].length;
    assert(off >= PAGE_HEADER_SIZE && off + len <= PAGE_SIZE);
    out->data = pg->bytes + off;
    out->len = len;
    out->flags = pg->slots[slot].flags;
    return 0;
}""",
        patch=(
            (
                "    assert(off >= PAGE_HEADER_SIZE && off + len <= PAGE_SIZE);\n",
                "    if (off < PAGE_HEADER_SIZE || off + len > PAGE_SIZE)\n        return -EIO;\n",
            ),
        ),
        benign=(
            r"""unsigned int page_free_space(const struct page *pg)
{
    unsigned int used = PAGE_HEADER_SIZE;
    unsigned int i;

    used += pg->hdr.nslots * (unsigned int)sizeof(struct slot);
    for (i = 0; i < pg->hdr.nslots; i++) {
        if (pg->slots[i].flags & SLOT_DEAD)
            continue;
        used += pg->slots[i].length;
    }
    return used >= PAGE_SIZE ? 0 : PAGE_SIZE - used;
}""",
        ),
    ),
    Fix(
        split="test",
        project="timerq",
        file_name="timer.c",
        cwe="CWE-416",
        cve_desc="A use-after-free in timerq_expire in timer.c in timerq before 1.1.4 allows attackers to cause a "
        "denial of service or possibly execute arbitrary code by arranging for a one-shot timer to expire.",
        commit_message="timer: restart from the queue head after running a callback",
        vulnerable=r"""void timerq_expire(struct timerq *q, uint64_t now)
{
    struct timer *t = q->head;

    while (t != NULL && t->deadline <= now) {
        q->head = t->next;
        if (q->head != NULL)
            q->head->prev = NULL;
        q->count--;
        t->callback(t->arg);
        if (t->flags & TIMER_PERIODIC) {
            t->deadline = now + t->interval;
            timerq_insert(q, t);
        } else {
            free(t);
        }
        t = t->next;
    }
}""",
        patch=(("        t = t->next;\n    }\n}", "        t = q->head;\n    }\n}"),),
        benign=(
            r"""void timerq_insert(struct timerq *q, struct timer *t)
{
    struct timer *cur = q->head, *prev = NULL;

    while (cur != NULL && cur->deadline <= t->deadline) {
        prev = cur;
        cur = cur->next;
    }
    t->prev = prev;
    t->next = cur;
    if (cur != NULL)
        cur->prev = t;
    if (prev != NULL)
        prev->next = t;
    else
        q->head = t;
    q->count++;
}""",
        ),
    ),
    Fix(
        split="test",
        project="logd",
        file_name="ident.c",
        cwe="CWE-787",
        cve_desc="An off-by-one error in read_ident in ident.c in logd 2.x allows remote attackers to write a NUL "
        "byte past the end of a stack buffer via an ident line that fills the buffer.",
        commit_message="ident: leave room for the terminating NUL",
        vulnerable=r"""int read_ident(int fd, char *buf, size_t size)
{
    size_t len = 0;
    ssize_t n;

    while (len < size) {
        n = read(fd, buf + len, size - len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break;
        len += (size_t)n;
        if (memchr(buf + len - n, '\n', (size_t)n) != NULL)
            break;
    }
    buf[len] = '\0';
    return (int)len;
}""",
        patch=(
            (
                "    while (len < size) {\n        n = read(fd, buf + len, size - len);",
                "    while (len + 1 < size) {\n        n = read(fd, buf + len, size - len - 1);",
            ),
        ),
        benign=(
            r"""static int ident_valid(const char *s, size_t len)
{
    size_t i;

    if (len == 0 || len > IDENT_MAX)
        return 0;
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];

        if (!isalnum(c) && c != '-' && c != '_' && c != '.')
            return 0;
    }
    return 1;
}""",
        ),
    ),
    Fix(
        split="test",
        project="kvstore",
        file_name="index.c",
        cwe="CWE-369",
        cve_desc="index_open in index.c in kvstore before 0.7.5 takes the bucket count from the index header and "
        "uses it as a divisor, which allows attackers who can modify a database file to crash the process with a "
        "zero bucket count.",
        commit_message="index: reject a zero bucket count",
        vulnerable=r"""int index_open(struct index *ix, const uint8_t *hdr, size_t hdr_len)
{
    uint32_t magic, nbuckets, seed;

    if (hdr_len < INDEX_HDR_SIZE)
        return -EINVAL;
    magic = rd_le32(hdr);
    nbuckets = rd_le32(hdr + 4);
    seed = rd_le32(hdr + 8);
    if (magic != INDEX_MAGIC)
        return -EINVAL;
    ix->nbuckets = nbuckets;
    ix->seed = seed;
    ix->root_bucket = hash32(INDEX_ROOT_KEY, seed) % nbuckets;
    ix->buckets = calloc(nbuckets, sizeof(*ix->buckets));
    if (ix->buckets == NULL)
        return -ENOMEM;
    return 0;
}""",
        patch=(("    if (magic != INDEX_MAGIC)\n", "    if (magic != INDEX_MAGIC || nbuckets == 0)\n"),),
        benign=(
            r"""uint32_t hash32(const char *key, uint32_t seed)
{
    uint32_t h = 2166136261u ^ seed;

    while (*key != '\0') {
        h ^= (uint8_t)*key++;
        h *= 16777619u;
    }
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    return h;
}""",
        ),
    ),
]


def md5_int(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest(), 16)


def func_hash(func: str) -> int:
    """PrimeVul's function hash: MD5 of the function with all whitespace removed."""
    return md5_int("".join(func.split()))


def apply_patch(func: str, patch: tuple[tuple[str, str], ...]) -> str:
    for old, new in patch:
        if func.count(old) != 1:
            raise ValueError(f"patch text found {func.count(old)} times, expected once: {old!r}")
        func = func.replace(old, new)
    return func


def record(fix: Fix, number: int, idx: int, func: str, target: int, fixed_file: bool) -> dict:
    """One line in the release's field order. Vulnerable functions come from the file before the fix."""
    cve = f"CVE-0000-{number:04d}"
    commit_id = hashlib.sha1(f"{fix.project}:{cve}".encode()).hexdigest()
    project_url = f"{URL_ROOT}/{fix.project}"
    file_version = "after" if fixed_file else "before"
    return {
        "idx": idx,
        "project": fix.project,
        "commit_id": commit_id,
        "project_url": project_url,
        "commit_url": f"{project_url}/commit/{commit_id}",
        "commit_message": fix.commit_message,
        "target": target,
        "func": func,
        "func_hash": func_hash(func),
        "file_name": fix.file_name or "None",
        "file_hash": md5_int(f"{commit_id}:{fix.file_name}:{file_version}") if fix.file_name else None,
        "cwe": [fix.cwe],
        "cve": cve,
        "cve_desc": fix.cve_desc,
        "nvd_url": f"https://nvd.nist.gov/vuln/detail/{cve}",
    }


def build() -> dict[str, list[dict]]:
    """File name -> records: paired files hold (vulnerable, fixed) lines; unpaired ones add the benign functions."""
    files: dict[str, list[dict]] = {}
    for number, fix in enumerate(FIXES, start=1):
        fixed = apply_patch(fix.vulnerable, fix.patch)
        pair = [
            record(fix, number, 900_000 + 97 * number, fix.vulnerable, 1, fixed_file=False),
            record(fix, number, 910_000 + 89 * number, fixed, 0, fixed_file=True),
        ]
        benign = [
            record(fix, number, 920_000 + 83 * number + j, func, 0, fixed_file=True)
            for j, func in enumerate(fix.benign)
        ]
        files.setdefault(f"primevul_{fix.split}_paired.jsonl", []).extend(pair)
        files.setdefault(f"primevul_{fix.split}.jsonl", []).extend(pair + benign)
    for name, records in files.items():
        if not name.endswith("_paired.jsonl"):  # the release's unpaired files are not grouped by commit
            records.sort(key=lambda r: hashlib.md5(str(r["idx"]).encode()).hexdigest())
    return files


def write_sample(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in sorted(build().items()):
        path = out_dir / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for path in write_sample(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(path)
