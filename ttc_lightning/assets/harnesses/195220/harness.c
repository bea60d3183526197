/* Harness for tmate-ssh-server main (tmate-main.c), CVE-2021-44512.
 *
 * main parses the options, prepares the work directory TMATE_WORKDIR with its sessions/ and jail/
 * subdirectories, and starts the SSH server. The CVE is the mode it gives them: a world-writable
 * (0703) sessions directory, where any local user can plant or rename session sockets and symlinks.
 * The harness runs main for real on the file system: TMATE_WORKDIR is a relative path, and each case
 * runs in a fresh directory of its own, so the real mkdir/chmod/lstat decide.
 *
 * Stand-ins: struct tmate_settings as tmate.h declares it at the fix; xstrdup; the callees main makes
 * before the directories (logging, locale, hostname lookup, trace library, SIGSEGV handler, random
 * source) as no-ops that return what the real ones return on success; tmate_fatal (tmux's fatalx: log
 * and exit(1)) as a longjmp back to the driver; tmate_ssh_server_main records its arguments and returns;
 * check_owned_directory_mode is the static helper the fix added to tmate-main.c. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define TMATE_WORKDIR "tmate-workdir"
#define TMATE_SSH_DEFAULT_PORT 22
#define TMATE_DEFAULT_WEBSOCKET_PORT 4002
#define LOG_NOTICE 5

struct tmate_settings {
	const char *keys_dir;
	const char *authorized_keys_path;
	int ssh_port;
	int ssh_port_advertized;
	const char *websocket_hostname;
	int websocket_port;
	const char *tmate_host;
	const char *bind_addr;
	int log_level;
	bool use_proxy_protocol;
};

struct tmate_session { int unused; };

static struct tmate_settings _tmate_settings = {
	.keys_dir = "keys",
	.ssh_port = TMATE_SSH_DEFAULT_PORT,
	.websocket_port = TMATE_DEFAULT_WEBSOCKET_PORT,
	.log_level = LOG_NOTICE,
};
static struct tmate_settings *tmate_settings = &_tmate_settings;
static struct tmate_session _tmate_session, *tmate_session = &_tmate_session;
static char *cmdline;
static char *cmdline_end;

static char *xstrdup(const char *s)
{
	char *p = strdup(s);
	if (!p) abort();
	return p;
}

static jmp_buf fatal_jump;
static char fatal_message[512];
static void tmate_fatal(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void tmate_fatal(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(fatal_message, sizeof fatal_message, fmt, ap);
	va_end(ap);
	longjmp(fatal_jump, 1);
}

static int usage_printed;
static void usage(void)
{
	usage_printed = 1;
	fprintf(stderr, "usage: tmate-ssh-server [-b ip] [-h hostname] [-k keys_dir] [-p listen_port] "
			"[-q ssh_port_advertized] [-w websocket_hostname] [-z websocket_port] [-x] [-v]\n");
}

static void init_logging(int log_level) { (void)log_level; }
static void setup_locale(void) {}
static char *get_full_hostname(void) { return xstrdup("ssh.tmate.test"); }
static void tmate_preload_trace_lib(void) {}
static void tmate_catch_sigsegv(void) {}
static void tmate_init_rand(void) {}

static struct {
	int started;
	const char *keys_dir, *bind_addr;
	int port;
	int sessions_mode; /* the sessions directory's mode when the server starts */
} server;

static void tmate_ssh_server_main(struct tmate_session *session, const char *keys_dir, const char *bind_addr,
				  int port)
{
	struct stat st;
	(void)session;
	server.started = 1;
	server.keys_dir = keys_dir;
	server.bind_addr = bind_addr;
	server.port = port;
	server.sessions_mode = stat(TMATE_WORKDIR "/sessions", &st) ? -1 : (int)(st.st_mode & 07777);
}

/* tmate-main.c, added by the fix */
static int __attribute__((unused)) check_owned_directory_mode(const char *path, mode_t expected_mode)
{
	struct stat stat;
	if (lstat(path, &stat))
		return -1;
	if (!S_ISDIR(stat.st_mode))
		return -1;
	if (stat.st_uid != getuid())
		return -1;
	if ((stat.st_mode & 07777) != expected_mode)
		return -1;
	return 0;
}

#define main tmate_main
#include "function.c"
#undef main

/* ---- driver ---- */

static int fail;
#define EXPECT(cond) do { if (!(cond)) { fprintf(stderr, "FAIL: %s (line %d)\n", #cond, __LINE__); fail = 1; } } while (0)

static int mode_of(const char *path)
{
	struct stat st;
	return lstat(path, &st) ? -1 : (int)(st.st_mode & 07777);
}

static int is_dir(const char *path)
{
	struct stat st;
	return !lstat(path, &st) && S_ISDIR(st.st_mode);
}

/* runs main; returns its status, or -1 when it ended in tmate_fatal */
static int run(char **argv)
{
	static char env0[] = "HOME=/nonexistent";
	static char *envp[] = { env0, NULL };
	int argc = 0;
	while (argv[argc]) argc++;
	optind = 1;
	if (setjmp(fatal_jump)) return -1;
	return tmate_main(argc, argv, envp);
}

int main(int argc, char **argv)
{
	char dir[] = "case-XXXXXX";
	const char *c;
	int ret;

	if (argc < 2) return 2;
	c = argv[1];
	if (!mkdtemp(dir) || chdir(dir)) {
		perror("fresh directory");
		return 1;
	}
	umask(022);

	if (!strcmp(c, "sessions_not_world_writable")) {
		char *args[] = { "tmate-ssh-server", NULL };
		ret = run(args);
		EXPECT(ret == 0 && server.started);
		int mode = mode_of(TMATE_WORKDIR "/sessions");
		if (mode < 0 || (mode & 0007)) {
			fprintf(stderr, "FAIL: " TMATE_WORKDIR "/sessions: mode %04o, other users may write to it\n",
				mode < 0 ? 0 : mode);
			fail = 1;
		}
		EXPECT((mode_of(TMATE_WORKDIR) & 0007) == 0);
	} else if (!strcmp(c, "starts_with_options")) {
		char *args[] = { "tmate-ssh-server", "-k", "/etc/tmate-keys", "-b", "10.0.0.7", "-p", "2222",
				 "-h", "tmate.example", "-q", "22", "-w", "ws.example", "-z", "4100", "-x", "-v", NULL };
		ret = run(args);
		EXPECT(ret == 0);
		EXPECT(server.started && server.port == 2222);
		EXPECT(server.keys_dir && !strcmp(server.keys_dir, "/etc/tmate-keys"));
		EXPECT(server.bind_addr && !strcmp(server.bind_addr, "10.0.0.7"));
		EXPECT(tmate_settings->tmate_host && !strcmp(tmate_settings->tmate_host, "tmate.example"));
		EXPECT(tmate_settings->ssh_port_advertized == 22 && tmate_settings->websocket_port == 4100);
		EXPECT(tmate_settings->use_proxy_protocol && tmate_settings->log_level == LOG_NOTICE + 1);
		EXPECT(is_dir(TMATE_WORKDIR) && is_dir(TMATE_WORKDIR "/sessions") && is_dir(TMATE_WORKDIR "/jail"));
		EXPECT(mode_of(TMATE_WORKDIR "/jail") == 0700);
	} else if (!strcmp(c, "default_hostname")) {
		char *args[] = { "tmate-ssh-server", NULL };
		ret = run(args);
		EXPECT(ret == 0 && server.started && server.port == TMATE_SSH_DEFAULT_PORT);
		EXPECT(tmate_settings->tmate_host && !strcmp(tmate_settings->tmate_host, "ssh.tmate.test"));
		EXPECT(server.sessions_mode >= 0);
	} else if (!strcmp(c, "existing_dirs_tightened")) {
		char *args[] = { "tmate-ssh-server", NULL };
		EXPECT(!mkdir(TMATE_WORKDIR, 0755) && !mkdir(TMATE_WORKDIR "/sessions", 0777) &&
		       !mkdir(TMATE_WORKDIR "/jail", 0755));
		EXPECT(!chmod(TMATE_WORKDIR "/sessions", 0777));
		ret = run(args);
		EXPECT(ret == 0 && server.started);
		EXPECT(mode_of(TMATE_WORKDIR "/jail") == 0700);
		EXPECT((mode_of(TMATE_WORKDIR "/sessions") & 0007) == 0);
	} else if (!strcmp(c, "symlinked_jail_refused")) {
		/* a planted symlink in place of jail/: chmod follows it, but it is no directory of the server's */
		char *args[] = { "tmate-ssh-server", NULL };
		EXPECT(!mkdir(TMATE_WORKDIR, 0700) && !mkdir(TMATE_WORKDIR "/sessions", 0700) && !mkdir("elsewhere", 0755));
		EXPECT(!symlink("../elsewhere", TMATE_WORKDIR "/jail"));
		ret = run(args);
		EXPECT(ret == -1 && strstr(fatal_message, "incorrect ownership/mode"));
		EXPECT(!server.started);
	} else if (!strcmp(c, "workdir_not_a_directory")) {
		char *args[] = { "tmate-ssh-server", NULL };
		int fd = open(TMATE_WORKDIR, O_CREAT | O_WRONLY, 0600);
		EXPECT(fd >= 0);
		close(fd);
		ret = run(args);
		EXPECT(ret == -1 && strstr(fatal_message, "Cannot prepare session"));
		EXPECT(!server.started);
	} else if (!strcmp(c, "bad_option")) {
		char *args[] = { "tmate-ssh-server", "-Z", NULL };
		opterr = 0;
		ret = run(args);
		EXPECT(ret == 1 && usage_printed && !server.started);
		EXPECT(!is_dir(TMATE_WORKDIR));
	} else {
		return 2;
	}
	return fail;
}
