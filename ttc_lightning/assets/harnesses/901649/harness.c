#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "function.c"

#define IDENT_BUF 16

/* The peer: a pipe holding data, its write end closed (EOF after the data). */
static int peer(const char *data)
{
    int fds[2];

    if (pipe(fds) != 0)
        return -1;
    if (write(fds[1], data, strlen(data)) != (ssize_t)strlen(data))
        return -1;
    close(fds[1]);
    return fds[0];
}

/* Read an ident line into a stack buffer of IDENT_BUF bytes (as logd does) and check the result. */
static int run(const char *data, int want_rc, const char *want_buf)
{
    char buf[IDENT_BUF];
    int fd = peer(data);
    int rc;

    memset(buf, 'X', sizeof(buf));
    rc = read_ident(fd, buf, sizeof(buf));
    close(fd);
    if (rc != want_rc || (want_buf != NULL && strcmp(buf, want_buf) != 0)) {
        fprintf(stderr, "read_ident = %d \"%.*s\", expected %d \"%s\"\n", rc, IDENT_BUF, buf, want_rc,
                want_buf ? want_buf : "");
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    int ok;

    if (strcmp(c, "line_fills_buffer") == 0) {
        ok = run("abcdefghijklmnop", 15, "abcdefghijklmno");         /* 16 bytes, no newline */
    } else if (strcmp(c, "short_line") == 0) {
        ok = run("logd-01\n", 8, "logd-01\n");
    } else if (strcmp(c, "eof_without_newline") == 0) {
        ok = run("host", 4, "host");
    } else if (strcmp(c, "exact_fit_with_newline") == 0) {
        ok = run("abcdefghijklmn\n", 15, "abcdefghijklmn\n");        /* 15 bytes + NUL fill the buffer */
    } else if (strcmp(c, "long_line_truncated") == 0) {
        ok = run("abcdefghijklmnopqrstuvwxyz\n", 15, "abcdefghijklmno");
    } else if (strcmp(c, "read_error") == 0) {
        /* a closed descriptor: read fails with EBADF */
        char buf[IDENT_BUF];
        int fd = peer("x\n");

        close(fd);
        ok = read_ident(fd, buf, sizeof(buf)) == -1 && errno == EBADF;
    } else {
        return 2;
    }
    return ok ? 0 : 1;
}
