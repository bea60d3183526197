/* Harness for linux nfs4_file_open (fs/nfs/nfs4file.c), CVE-2022-24448 (commit ab0fc21bc710, the revert of
 * "NFSv4: Handle the special Linux file open access mode").
 *
 * The vulnerable function hands an open with the access mode 3 (O_ACCMODE: neither read nor write, Linux's
 * ioctl-only mode) to the generic nfs_open, which attaches an open context WITHOUT an NFSv4 open state
 * (ctx->state stays NULL); NFSv4 operations on the file later use that state, and lseek(SEEK_DATA) reaches
 * nfs4_valid_open_stateid(ctx->state) and dereferences NULL (the commit's reproducer: open O_ACCMODE|O_DIRECT,
 * then lseek). The fix opens such files through the NFSv4 OPEN path as O_RDWR, which sets the state.
 *
 * Stand-ins: the VFS objects (inode, dentry with its parent and reference count, file) with file_dentry,
 * dget_parent, dput, d_inode, d_drop; the NFS open context (refcounted, owning its dentry reference and its
 * open state) with alloc/get/put_nfs_open_context and nfs_file_set_open_context; nfs_open and
 * nfs_check_flags as in fs/nfs/inode.c and fs/nfs/file.c; NFS_PROTO(dir)->open_context as an NFSv4 OPEN
 * against a one-directory server table (its answer set by each case); nfs4_valid_open_stateid as in
 * nfs4_fs.h; and the SEEK_DATA path of nfs42_proc_llseek reduced to the state check it makes first. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef unsigned int fmode_t;

#define EOPENSTALE 518
#define MAX_ERRNO 4095
#define IS_ERR_VALUE(x) ((unsigned long)(void *)(x) >= (unsigned long)-MAX_ERRNO)
static inline void *ERR_PTR(long error) { return (void *)error; }
static inline long PTR_ERR(const void *ptr) { return (long)ptr; }
static inline bool IS_ERR(const void *ptr) { return IS_ERR_VALUE((unsigned long)ptr); }

#define FMODE_READ ((fmode_t)0x1)
#define FMODE_WRITE ((fmode_t)0x2)
#define FMODE_EXEC ((fmode_t)0x20)
#define ATTR_SIZE (1 << 3)
#define ATTR_OPEN (1 << 15)

#define dprintk(fmt, ...) do { } while (0)

struct address_space { int writebacks; };

struct inode {
	unsigned long i_ino;
	struct address_space *i_mapping;
	struct address_space i_data;
};

struct dentry {
	const char *d_name;
	struct inode *d_inode;
	struct dentry *d_parent;
	int d_count;
	bool dropped;
};

struct path { struct dentry *dentry; };

struct file {
	struct path f_path;
	unsigned int f_flags;
	fmode_t f_mode;
	void *private_data;
};

struct iattr {
	unsigned int ia_valid;
	loff_t ia_size;
};

static inline struct dentry *file_dentry(const struct file *file) { return file->f_path.dentry; }
static inline struct inode *d_inode(const struct dentry *dentry) { return dentry->d_inode; }
static struct dentry *dget(struct dentry *d) { d->d_count++; return d; }
static struct dentry *dget_parent(struct dentry *d) { return dget(d->d_parent); }
static void dput(struct dentry *d)
{
	if (!d) return;
	if (--d->d_count < 0) abort(); /* an unbalanced dput */
}
static void d_drop(struct dentry *d) { d->dropped = true; }

static int filemap_write_and_wait(struct address_space *mapping)
{
	mapping->writebacks++;
	return 0;
}

/* fs/nfs/nfs4_fs.h */
enum { NFS_DELEGATED_STATE, NFS_OPEN_STATE, NFS_STATE_RECOVERY_FAILED = 8 };

struct nfs4_state {
	unsigned long flags;
	fmode_t state; /* the OPEN's share access */
};

static inline bool nfs4_valid_open_stateid(const struct nfs4_state *state)
{
	return (state->flags & (1UL << NFS_STATE_RECOVERY_FAILED)) == 0;
}

/* include/linux/nfs_fs.h */
struct nfs_open_context {
	int refcount;
	struct dentry *dentry;
	fmode_t mode;
	struct nfs4_state *state;
};

static int live_contexts;

static struct nfs_open_context *alloc_nfs_open_context(struct dentry *dentry, fmode_t f_mode, struct file *filp)
{
	struct nfs_open_context *ctx = calloc(1, sizeof *ctx);
	(void)filp;
	if (!ctx) return ERR_PTR(-ENOMEM);
	ctx->refcount = 1;
	ctx->dentry = dget(dentry);
	ctx->mode = f_mode;
	ctx->state = NULL;
	live_contexts++;
	return ctx;
}

static struct nfs_open_context *get_nfs_open_context(struct nfs_open_context *ctx)
{
	ctx->refcount++;
	return ctx;
}

static void put_nfs_open_context(struct nfs_open_context *ctx)
{
	if (--ctx->refcount > 0) return;
	free(ctx->state); /* nfs4_close_state */
	dput(ctx->dentry);
	live_contexts--;
	free(ctx);
}

static void nfs_file_set_open_context(struct file *filp, struct nfs_open_context *ctx)
{
	filp->private_data = get_nfs_open_context(ctx);
}

static inline struct nfs_open_context *nfs_file_open_context(struct file *filp)
{
	return filp->private_data;
}

static void nfs_fscache_open_file(struct inode *inode, struct file *filp) { (void)inode; (void)filp; }

static inline fmode_t flags_to_mode(int flags)
{
	fmode_t res = (fmode_t)flags & FMODE_EXEC;
	if ((flags & O_ACCMODE) != O_WRONLY)
		res |= FMODE_READ;
	if ((flags & O_ACCMODE) != O_RDONLY)
		res |= FMODE_WRITE;
	return res;
}

/* fs/nfs/inode.c: the generic open, which sets up no NFSv4 open state */
static int nfs_open(struct inode *inode, struct file *filp)
{
	struct nfs_open_context *ctx;

	ctx = alloc_nfs_open_context(file_dentry(filp), flags_to_mode(filp->f_flags), filp);
	if (IS_ERR(ctx))
		return PTR_ERR(ctx);
	nfs_file_set_open_context(filp, ctx);
	put_nfs_open_context(ctx);
	nfs_fscache_open_file(inode, filp);
	return 0;
}

/* fs/nfs/file.c */
static int nfs_check_flags(int flags)
{
	if ((flags & (O_APPEND | O_DIRECT)) == (O_APPEND | O_DIRECT))
		return -EINVAL;
	return 0;
}

/* the server's answer to the NFSv4 OPEN of the case's file: the inode it resolves to, or an error */
static struct {
	struct inode *inode;
	int error;
	int calls;
	int open_flags;
	struct iattr attr;
} server;

/* NFS_PROTO(dir)->open_context: nfs4_atomic_open, an OPEN that gives the context its open state */
static struct inode *nfs4_atomic_open(struct inode *dir, struct nfs_open_context *ctx, int open_flags,
				      struct iattr *attr, int *opened)
{
	struct nfs4_state *state;
	(void)dir; (void)opened;
	server.calls++;
	server.open_flags = open_flags;
	server.attr = *attr;
	if (server.error)
		return ERR_PTR(server.error);
	state = calloc(1, sizeof *state);
	state->flags = 1UL << NFS_OPEN_STATE;
	state->state = flags_to_mode(open_flags) & (FMODE_READ | FMODE_WRITE);
	ctx->state = state;
	return server.inode;
}

struct nfs_rpc_ops {
	struct inode *(*open_context)(struct inode *, struct nfs_open_context *, int, struct iattr *, int *);
};
static const struct nfs_rpc_ops nfs_v4_clientops = { .open_context = nfs4_atomic_open };
#define NFS_PROTO(inode) (&nfs_v4_clientops)

/* nfs42_proc_llseek(SEEK_DATA): _nfs42_proc_llseek -> nfs4_set_rw_stateid -> nfs4_select_rw_stateid,
 * whose first step checks the open state; the server's answer is then the offset itself */
static loff_t nfs42_llseek_data(struct file *filp, loff_t offset)
{
	struct nfs_open_context *ctx = nfs_file_open_context(filp);
	if (!nfs4_valid_open_stateid(ctx->state))
		return -EIO;
	return offset;
}

static int nfs4_file_release(struct file *filp)
{
	if (filp->private_data) put_nfs_open_context(filp->private_data);
	filp->private_data = NULL;
	return 0;
}

static int
#include "function.c"

/* ---- driver ---- */

static int fail;
#define EXPECT(cond) do { if (!(cond)) { fprintf(stderr, "FAIL: %s (line %d)\n", #cond, __LINE__); fail = 1; } } while (0)

int main(int argc, char **argv)
{
	struct inode dir_inode = { .i_ino = 2 }, file_inode = { .i_ino = 12 }, other_inode = { .i_ino = 13 };
	struct dentry root = { .d_name = "export", .d_inode = &dir_inode, .d_count = 1 };
	struct dentry dentry = { .d_name = "file", .d_inode = &file_inode, .d_parent = &root, .d_count = 1 };
	struct file filp = { .f_path = { &dentry } };
	const char *c;
	int err;

	if (argc < 2) return 2;
	c = argv[1];
	root.d_parent = &root;
	file_inode.i_mapping = &file_inode.i_data;
	server.inode = &file_inode;

	if (!strcmp(c, "accmode3_then_llseek")) {
		/* open("/mnt/file", O_ACCMODE|O_DIRECT) on a cached dentry, then lseek(fd, 0, SEEK_DATA) */
		filp.f_flags = O_ACCMODE | O_DIRECT;
		filp.f_mode = 0; /* OPEN_FMODE(3): neither FMODE_READ nor FMODE_WRITE */
		err = nfs4_file_open(&file_inode, &filp);
		EXPECT(err == 0 && filp.private_data);
		if (err == 0 && filp.private_data) {
			EXPECT(nfs42_llseek_data(&filp, 4096) == 4096);
			nfs4_file_release(&filp);
		}
	} else if (!strcmp(c, "open_read_only")) {
		filp.f_flags = O_RDONLY;
		filp.f_mode = FMODE_READ;
		err = nfs4_file_open(&file_inode, &filp);
		EXPECT(err == 0);
		EXPECT(server.calls == 1 && (server.open_flags & O_ACCMODE) == O_RDONLY);
		EXPECT(server.attr.ia_valid == ATTR_OPEN);
		EXPECT(filp.private_data && ((struct nfs_open_context *)filp.private_data)->refcount == 1);
		EXPECT(filp.private_data && ((struct nfs_open_context *)filp.private_data)->mode == FMODE_READ);
		EXPECT(filp.private_data && nfs42_llseek_data(&filp, 10) == 10);
		nfs4_file_release(&filp);
	} else if (!strcmp(c, "open_truncate")) {
		filp.f_flags = O_RDWR | O_TRUNC | O_CREAT | O_EXCL;
		filp.f_mode = FMODE_READ | FMODE_WRITE;
		err = nfs4_file_open(&file_inode, &filp);
		EXPECT(err == 0 && filp.private_data);
		EXPECT(server.calls == 1 && !(server.open_flags & (O_CREAT | O_EXCL)) && (server.open_flags & O_TRUNC));
		EXPECT(server.attr.ia_valid == (ATTR_OPEN | ATTR_SIZE) && server.attr.ia_size == 0);
		EXPECT(file_inode.i_data.writebacks == 1);
		nfs4_file_release(&filp);
	} else if (!strcmp(c, "stale_on_server")) {
		/* removed on the server since the dentry was cached: drop it and let the VFS retry the lookup */
		filp.f_flags = O_WRONLY;
		filp.f_mode = FMODE_WRITE;
		server.error = -ENOENT;
		err = nfs4_file_open(&file_inode, &filp);
		EXPECT(err == -EOPENSTALE && dentry.dropped && !filp.private_data);
		server.error = 0;
		server.inode = &other_inode; /* replaced by another file */
		dentry.dropped = false;
		err = nfs4_file_open(&file_inode, &filp);
		EXPECT(err == -EOPENSTALE && dentry.dropped && !filp.private_data);
	} else if (!strcmp(c, "server_refuses")) {
		filp.f_flags = O_RDWR;
		filp.f_mode = FMODE_READ | FMODE_WRITE;
		server.error = -EACCES;
		err = nfs4_file_open(&file_inode, &filp);
		EXPECT(err == -EACCES && !dentry.dropped && !filp.private_data);
	} else if (!strcmp(c, "append_direct_refused")) {
		filp.f_flags = O_WRONLY | O_APPEND | O_DIRECT;
		filp.f_mode = FMODE_WRITE;
		err = nfs4_file_open(&file_inode, &filp);
		EXPECT(err == -EINVAL && server.calls == 0 && !filp.private_data);
	} else {
		return 2;
	}
	/* every reference taken is given back */
	EXPECT(live_contexts == 0);
	EXPECT(dentry.d_count == 1 && root.d_count == 1);
	return fail;
}
