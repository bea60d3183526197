/* Harness for netcfg netcfg_apply_mtu (CVE-0000-0003, CWE-476). */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h> /* LOG_WARNING */

struct netcfg_section {
    const char *keys[4];
    const char *values[4];
};

struct netcfg_iface {
    const char *name;
    struct netcfg_section *section;
    int mtu;
};

struct netcfg {
    struct netcfg_iface *ifaces;
    int n_ifaces;
    char last_log[256]; /* the last netcfg_log message */
    int last_level;
};

/* The interface named ifname, NULL when the configuration has none (the case the fix handles). */
static struct netcfg_iface *netcfg_find_iface(struct netcfg *cfg, const char *ifname)
{
    for (int i = 0; i < cfg->n_ifaces; i++)
        if (strcmp(cfg->ifaces[i].name, ifname) == 0)
            return &cfg->ifaces[i];
    return NULL;
}

/* The value of key in the section, NULL when absent. */
static const char *netcfg_get(struct netcfg_section *sec, const char *key)
{
    for (int i = 0; i < 4 && sec->keys[i]; i++)
        if (strcmp(sec->keys[i], key) == 0)
            return sec->values[i];
    return NULL;
}

static void netcfg_log(struct netcfg *cfg, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cfg->last_log, sizeof cfg->last_log, fmt, ap);
    va_end(ap);
    cfg->last_level = level;
}

#include "function.c"

/* Two interfaces: eth0 with the given mtu value (none when NULL), wlan0 with mtu 9000. Heap-allocated. */
static struct netcfg *make_cfg(const char *eth0_mtu)
{
    struct netcfg *cfg = calloc(1, sizeof *cfg);
    struct netcfg_section *s = calloc(2, sizeof *s);
    cfg->ifaces = calloc(2, sizeof *cfg->ifaces);
    cfg->n_ifaces = 2;
    s[0].keys[0] = "address";
    s[0].values[0] = "192.0.2.1/24";
    if (eth0_mtu) {
        s[0].keys[1] = "mtu";
        s[0].values[1] = eth0_mtu;
    }
    s[1].keys[0] = "mtu";
    s[1].values[0] = "9000";
    cfg->ifaces[0] = (struct netcfg_iface){"eth0", &s[0], 1500};
    cfg->ifaces[1] = (struct netcfg_iface){"wlan0", &s[1], 1500};
    return cfg;
}

static void free_cfg(struct netcfg *cfg)
{
    free(cfg->ifaces[0].section);
    free(cfg->ifaces);
    free(cfg);
}

static int case_unknown_iface(void)
{
    struct netcfg *cfg = make_cfg("1400");
    int rc = netcfg_apply_mtu(cfg, "eth9");
    int ok = rc == -ENODEV && cfg->ifaces[0].mtu == 1500 && cfg->ifaces[1].mtu == 1500;
    free_cfg(cfg);
    return !ok;
}

static int case_apply_mtu(void)
{
    struct netcfg *cfg = make_cfg("1400");
    int rc = netcfg_apply_mtu(cfg, "eth0");
    int ok = rc == 0 && cfg->ifaces[0].mtu == 1400 && cfg->ifaces[1].mtu == 1500 && cfg->last_log[0] == '\0';
    free_cfg(cfg);
    return !ok;
}

static int case_no_mtu_key(void)
{
    struct netcfg *cfg = make_cfg(NULL);
    int rc = netcfg_apply_mtu(cfg, "eth0");
    int ok = rc == 0 && cfg->ifaces[0].mtu == 1500 && cfg->last_log[0] == '\0';
    free_cfg(cfg);
    return !ok;
}

static int case_invalid_mtu(void)
{
    struct netcfg *cfg = make_cfg("15OO");
    int rc = netcfg_apply_mtu(cfg, "eth0");
    int ok = rc == -EINVAL && cfg->ifaces[0].mtu == 1500 && cfg->last_level == LOG_WARNING &&
             strcmp(cfg->last_log, "eth0: invalid mtu '15OO'") == 0;
    free_cfg(cfg);
    return !ok;
}

static int case_out_of_range(void)
{
    const char *bad[] = {"67", "65536", "-1500", "99999999999999999999"};
    const char *good[] = {"68", "65535"};
    int ok = 1;
    for (int i = 0; i < 4; i++) {
        struct netcfg *cfg = make_cfg(bad[i]);
        ok = ok && netcfg_apply_mtu(cfg, "eth0") == -EINVAL && cfg->ifaces[0].mtu == 1500;
        free_cfg(cfg);
    }
    for (int i = 0; i < 2; i++) {
        struct netcfg *cfg = make_cfg(good[i]);
        ok = ok && netcfg_apply_mtu(cfg, "eth0") == 0 && cfg->ifaces[0].mtu == atoi(good[i]);
        free_cfg(cfg);
    }
    return !ok;
}

static int case_second_iface(void)
{
    struct netcfg *cfg = make_cfg("1400");
    int rc = netcfg_apply_mtu(cfg, "wlan0");
    int ok = rc == 0 && cfg->ifaces[1].mtu == 9000 && cfg->ifaces[0].mtu == 1500;
    free_cfg(cfg);
    return !ok;
}

int main(int argc, char **argv)
{
    static const struct { const char *name; int (*fn)(void); } cases[] = {
        {"unknown_iface", case_unknown_iface},
        {"apply_mtu", case_apply_mtu},
        {"no_mtu_key", case_no_mtu_key},
        {"invalid_mtu", case_invalid_mtu},
        {"out_of_range", case_out_of_range},
        {"second_iface", case_second_iface},
    };
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].fn();
    fprintf(stderr, "unknown case: %s\n", argv[1]);
    return 2;
}
