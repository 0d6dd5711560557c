/*
 * virtio-fs (virtio 1.2 §5.11): the fs step, a minimal FUSE client on the
 * first virtio-fs device, polled. Its queues are served by a vhost-user
 * backend (virtiofsd) under both vmkit and Cloud Hypervisor, so the step
 * checks the transport, the device config and shared guest memory end to
 * end.
 *
 * Requests go as Linux's virtio_fs sends them: one chain each, the
 * device-readable fuse_in_header, the op's struct and its name or data in
 * separate descriptors, then the device-writable fuse_out_header and the
 * reply (struct or READ data) in separate descriptors. FORGET (no reply)
 * goes on the hiprio queue (0), everything else on request queue 0 (queue
 * 1). Every reply is checked before use: its unique id, its length against
 * the used length (itself bounded by the writable bytes, vq_poll), its error
 * and the size of what the op expects. The byte loops (hash, pattern) run at
 * CPL3 (user.c).
 */
#include "pci.h"

#define FS_TAG_LEN 36
#define FS_CFG_LEN (FS_TAG_LEN + 4) /* tag, num_request_queues */
#define FS_TIMEOUT_MS 5000
#define FS_CHUNK (64 * 1024)     /* at most this many bytes per READ or WRITE */
#define FS_FILE_MAX (1024 * 1024) /* the most the step reads, and writes */
#define FS_NAME_MAX 255

/* FUSE 7.31, as Linux 5.x speaks it (include/uapi/linux/fuse.h). */
#define FUSE_MAJOR 7
#define FUSE_MINOR 31
#define FUSE_ROOT_ID 1
#define FUSE_BIG_WRITES (1u << 5)
#define FUSE_MAX_PAGES (1u << 22)
#define FUSE_ERRNO_MAX 4095
enum {
    FUSE_LOOKUP = 1,
    FUSE_FORGET = 2,
    FUSE_GETATTR = 3,
    FUSE_OPEN = 14,
    FUSE_READ = 15,
    FUSE_WRITE = 16,
    FUSE_RELEASE = 18,
    FUSE_FSYNC = 20,
    FUSE_FLUSH = 25,
    FUSE_INIT = 26,
    FUSE_CREATE = 35,
};
#define L_O_RDONLY 0
#define L_O_WRONLY 01
#define L_O_CREAT 0100
#define L_O_TRUNC 01000
#define L_S_IFMT 0170000
#define L_S_IFREG 0100000
#define FS_LOCK_OWNER 0x766d6b6974ULL /* FLUSH names the "process" closing: any id */

struct fuse_in_header {
    u32 len, opcode;
    u64 unique, nodeid;
    u32 uid, gid, pid;
    u16 total_extlen, padding;
};
struct fuse_out_header {
    u32 len;
    int32_t error;
    u64 unique;
};
struct fuse_attr {
    u64 ino, size, blocks, atime, mtime, ctime;
    u32 atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct fuse_entry_out {
    u64 nodeid, generation, entry_valid, attr_valid;
    u32 entry_valid_nsec, attr_valid_nsec;
    struct fuse_attr attr;
};
struct fuse_init_in {
    u32 major, minor, max_readahead, flags;
};
struct fuse_init_out {
    u32 major, minor, max_readahead, flags;
    u16 max_background, congestion_threshold;
    u32 max_write, time_gran;
    u16 max_pages, map_alignment;
    u32 flags2, unused[7];
};
#define FUSE_COMPAT_22_INIT_OUT_SIZE 24 /* up to max_write: what the step needs */
struct fuse_open_in {
    u32 flags, open_flags;
};
struct fuse_create_in {
    u32 flags, mode, umask, open_flags;
};
struct fuse_open_out {
    u64 fh;
    u32 open_flags, padding;
};
struct fuse_create_out { /* CREATE answers both */
    struct fuse_entry_out entry;
    struct fuse_open_out open;
};
struct fuse_release_in {
    u64 fh;
    u32 flags, release_flags;
    u64 lock_owner;
};
struct fuse_flush_in {
    u64 fh;
    u32 unused, padding;
    u64 lock_owner;
};
struct fuse_io_in { /* fuse_read_in and fuse_write_in have the same layout */
    u64 fh, offset;
    u32 size, io_flags;
    u64 lock_owner;
    u32 flags, padding;
};
struct fuse_write_out {
    u32 size, padding;
};
struct fuse_fsync_in {
    u64 fh;
    u32 fsync_flags, padding;
};
struct fuse_getattr_in {
    u32 getattr_flags, dummy;
    u64 fh;
};
struct fuse_attr_out {
    u64 attr_valid;
    u32 attr_valid_nsec, dummy;
    struct fuse_attr attr;
};
struct fuse_forget_in {
    u64 nlookup;
};
_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_io_in) == 40, "fuse_read_in/fuse_write_in");
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");

/* One request and what came back. */
struct fs_call {
    const char *op; /* FUSE's name for it, in failures */
    u32 opcode;
    u64 nodeid;
    u16 queue;                       /* 0: hiprio (FORGET), 1: request queue 0 */
    const void *arg;                 /* the op's struct */
    u32 arg_len;
    const void *arg2;                /* a name (with its NUL) or WRITE's data */
    u32 arg2_len;
    void *reply;                     /* the reply's struct */
    u32 reply_len;
    void *data;                      /* READ's data */
    u32 data_len;
    bool no_reply;                   /* FORGET: nothing device-writable */
    u32 got;                         /* reply bytes after the out header */
};

/* Request buffers: the device reads and writes them, so they stay put between calls. */
static struct fuse_in_header fs_in;
static struct fuse_out_header fs_out;
static u8 fs_arg[64] __attribute__((aligned(8)));
static char fs_name[FS_NAME_MAX + 1];
static union {
    struct fuse_init_out init;
    struct fuse_entry_out entry;
    struct fuse_create_out create;
    struct fuse_open_out open;
    struct fuse_write_out write;
    struct fuse_attr_out attr;
} fs_reply;
static u64 fs_unique;
static u64 fs_read_tsc, fs_write_tsc; /* the READ and WRITE loops' time (fs_rounds) */
static u8 *fs_data; /* FS_FILE_MAX read buffer, then FS_FILE_MAX write buffer; allocated once */

static bool fs_fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    res_vdev(r, v);
    return false;
}

/* "<op><what><n><what2>" and the device: a reply the step cannot use. */
static bool bad_reply(struct result *r, const struct vdev *v, const struct fs_call *c,
                      const char *what, u64 n, const char *what2)
{
    res_str(r, c->op);
    res_str(r, what);
    res_dec(r, n);
    return fs_fail(r, v, what2);
}

static void add_buf(struct vbuf *b, u32 *n, const void *addr, u32 len, bool write)
{
    b[*n].addr = (u64)addr;
    b[*n].len = len;
    b[*n].write = write;
    (*n)++;
}

/*
 * Sends c and waits for its completion; on success c->got is the reply's
 * length after the out header (0 for FORGET). A negative error fails the
 * step as "<op> error=<errno>".
 */
static bool fs_do(struct vdev *v, struct fs_call *c, struct result *r)
{
    struct virtq *q = &v->q[c->queue];
    struct vbuf b[5];
    u32 n = 0, used;

    fs_in.len = (u32)sizeof(fs_in) + c->arg_len + c->arg2_len;
    fs_in.opcode = c->opcode;
    fs_in.unique = ++fs_unique;
    fs_in.nodeid = c->nodeid;
    fs_in.uid = 0;
    fs_in.gid = 0;
    fs_in.pid = 1;
    fs_in.total_extlen = 0;
    fs_in.padding = 0;
    add_buf(b, &n, &fs_in, sizeof(fs_in), false);
    if (c->arg_len)
        add_buf(b, &n, c->arg, c->arg_len, false);
    if (c->arg2_len)
        add_buf(b, &n, c->arg2, c->arg2_len, false);
    if (!c->no_reply) {
        /* Poisoned: a server that writes nothing cannot pass for an answer. */
        fs_out.len = 0;
        fs_out.error = 0;
        fs_out.unique = 0;
        add_buf(b, &n, &fs_out, sizeof(fs_out), true);
        if (c->reply_len) {
            memset(c->reply, 0, c->reply_len);
            add_buf(b, &n, c->reply, c->reply_len, true);
        }
        if (c->data_len)
            add_buf(b, &n, c->data, c->data_len, true);
    }
    c->got = 0;
    if (!vq_submit(v, q, b, n, r) || !vq_wait(v, q, &used, FS_TIMEOUT_MS, r))
        return false;
    if (c->no_reply) /* vq_poll checked: used len 0, nothing was writable */
        return true;
    if (used < sizeof(fs_out))
        return bad_reply(r, v, c, " used len ", used, " is shorter than fuse_out_header");
    if (fs_out.unique != fs_in.unique) {
        res_str(r, c->op);
        res_str(r, " reply unique ");
        res_dec(r, fs_out.unique);
        res_str(r, " for request ");
        res_dec(r, fs_in.unique);
        return fs_fail(r, v, "");
    }
    if (fs_out.len < sizeof(fs_out) || fs_out.len > used) {
        res_str(r, c->op);
        res_str(r, " reply len ");
        res_dec(r, fs_out.len);
        res_str(r, " with used len ");
        res_dec(r, used);
        return fs_fail(r, v, "");
    }
    if (fs_out.error) {
        if (fs_out.error > 0 || fs_out.error < -FUSE_ERRNO_MAX) {
            res_str(r, c->op);
            res_str(r, " reply error ");
            res_hex(r, (u32)fs_out.error);
            return fs_fail(r, v, " is not a negative errno");
        }
        res_str(r, c->op);
        res_str(r, " error=-");
        res_dec(r, (u64)(-(int64_t)fs_out.error));
        return false;
    }
    c->got = fs_out.len - (u32)sizeof(fs_out); /* <= the writable bytes after the header */
    return true;
}

/* The reply must hold at least `need` bytes (its struct). */
static bool reply_has(struct result *r, const struct vdev *v, const struct fs_call *c, u32 need)
{
    if (c->got >= need)
        return true;
    res_str(r, c->op);
    res_str(r, " reply of ");
    res_dec(r, c->got);
    res_str(r, " bytes, ");
    res_dec(r, need);
    return fs_fail(r, v, " expected");
}

/* A call on the request queue with the op's struct as its only argument. */
static void call_init(struct fs_call *c, const char *op, u32 opcode, u64 nodeid, u32 arg_len)
{
    memset(c, 0, sizeof(*c));
    c->op = op;
    c->opcode = opcode;
    c->nodeid = nodeid;
    c->queue = 1;
    c->arg = fs_arg;
    c->arg_len = arg_len;
    memset(fs_arg, 0, sizeof(fs_arg));
}

/* The tag, up to its first NUL; other unprintable bytes as '?'. */
static bool read_tag(struct vdev *v, char *tag, u32 *tag_len, u32 *nreq, struct result *r)
{
    u32 tries, i;
    for (tries = 0;; tries++) {
        u8 gen = virtio_cfg_gen(v);
        *tag_len = 0;
        for (i = 0; i < FS_TAG_LEN; i++) {
            u8 c = virtio_cfg8(v, i);
            if (!c)
                break;
            tag[(*tag_len)++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
        }
        *nreq = virtio_cfg32(v, FS_TAG_LEN);
        if (virtio_cfg_gen(v) == gen)
            return true;
        if (tries == 10)
            return fs_fail(r, v, "config generation keeps changing");
    }
}

static bool fs_init(struct vdev *v, u32 *max_write, struct result *r)
{
    struct fuse_init_in *in = (struct fuse_init_in *)fs_arg;
    struct fs_call c;
    struct line l;

    call_init(&c, "INIT", FUSE_INIT, 0, sizeof(*in));
    in->major = FUSE_MAJOR;
    in->minor = FUSE_MINOR;
    in->max_readahead = 128 * 1024;
    in->flags = FUSE_BIG_WRITES | FUSE_MAX_PAGES;
    c.reply = &fs_reply.init;
    c.reply_len = sizeof(fs_reply.init);
    if (!fs_do(v, &c, r) || !reply_has(r, v, &c, FUSE_COMPAT_22_INIT_OUT_SIZE))
        return false;
    line_begin(&l);
    line_str(&l, "fs init major=");
    line_dec(&l, fs_reply.init.major);
    line_str(&l, " minor=");
    line_dec(&l, fs_reply.init.minor);
    line_str(&l, " max_write=");
    line_dec(&l, fs_reply.init.max_write);
    line_end(&l);
    if (fs_reply.init.major != FUSE_MAJOR)
        return bad_reply(r, v, &c, " major version ", fs_reply.init.major, " (7 sent)");
    /* Linux's floor: a smaller max_write is taken as 4096. */
    *max_write = fs_reply.init.max_write < 4096 ? 4096 : fs_reply.init.max_write;
    return true;
}

/* fs_name = cfg's name plus its NUL; returns the bytes FUSE carries. */
static u32 set_name(const char *name, size_t len)
{
    memcpy(fs_name, name, len);
    fs_name[len] = 0;
    return (u32)len + 1;
}

static bool fs_lookup(struct vdev *v, const char *name, size_t len, struct fuse_entry_out *e,
                      struct result *r)
{
    struct fs_call c;
    call_init(&c, "LOOKUP", FUSE_LOOKUP, FUSE_ROOT_ID, 0);
    c.arg = fs_name;
    c.arg_len = set_name(name, len);
    c.reply = &fs_reply.entry;
    c.reply_len = sizeof(fs_reply.entry);
    if (!fs_do(v, &c, r) || !reply_has(r, v, &c, sizeof(*e)))
        return false;
    *e = fs_reply.entry;
    if (!e->nodeid)
        return fs_fail(r, v, "LOOKUP gave node id 0");
    return true;
}

static bool fs_open(struct vdev *v, u64 nodeid, u32 flags, u64 *fh, struct result *r)
{
    struct fuse_open_in *in = (struct fuse_open_in *)fs_arg;
    struct fs_call c;
    call_init(&c, "OPEN", FUSE_OPEN, nodeid, sizeof(*in));
    in->flags = flags;
    c.reply = &fs_reply.open;
    c.reply_len = sizeof(fs_reply.open);
    if (!fs_do(v, &c, r) || !reply_has(r, v, &c, sizeof(fs_reply.open)))
        return false;
    *fh = fs_reply.open.fh;
    return true;
}

/* READ (data != NULL) or WRITE of len bytes at offset; *done: bytes moved. */
static bool fs_io(struct vdev *v, u64 nodeid, u64 fh, u32 flags, u64 offset, u8 *data, u32 len,
                  bool write, u32 *done, struct result *r)
{
    struct fuse_io_in *in = (struct fuse_io_in *)fs_arg;
    struct fs_call c;
    call_init(&c, write ? "WRITE" : "READ", write ? FUSE_WRITE : FUSE_READ, nodeid, sizeof(*in));
    in->fh = fh;
    in->offset = offset;
    in->size = len;
    in->flags = flags;
    if (write) {
        c.arg2 = data;
        c.arg2_len = len;
        c.reply = &fs_reply.write;
        c.reply_len = sizeof(fs_reply.write);
    } else {
        c.data = data;
        c.data_len = len;
    }
    if (!fs_do(v, &c, r))
        return false;
    if (!write) {
        *done = c.got; /* <= len: fs_do bounded it by the writable bytes */
        return true;
    }
    if (!reply_has(r, v, &c, sizeof(fs_reply.write)))
        return false;
    if (fs_reply.write.size != len) {
        res_str(r, "WRITE wrote ");
        res_dec(r, fs_reply.write.size);
        res_str(r, " of ");
        res_dec(r, len);
        return fs_fail(r, v, " bytes");
    }
    *done = len;
    return true;
}

/* RELEASE, FLUSH or FSYNC of an open file: nothing but the header comes back. */
static bool fs_close_op(struct vdev *v, u32 opcode, u64 nodeid, u64 fh, u32 flags,
                        struct result *r)
{
    struct fs_call c;
    if (opcode == FUSE_RELEASE) {
        struct fuse_release_in *in = (struct fuse_release_in *)fs_arg;
        call_init(&c, "RELEASE", opcode, nodeid, sizeof(*in));
        in->fh = fh;
        in->flags = flags;
    } else if (opcode == FUSE_FLUSH) {
        struct fuse_flush_in *in = (struct fuse_flush_in *)fs_arg;
        call_init(&c, "FLUSH", opcode, nodeid, sizeof(*in));
        in->fh = fh;
        in->lock_owner = FS_LOCK_OWNER;
    } else {
        struct fuse_fsync_in *in = (struct fuse_fsync_in *)fs_arg;
        call_init(&c, "FSYNC", opcode, nodeid, sizeof(*in));
        in->fh = fh; /* fsync_flags 0: data and metadata */
    }
    return fs_do(v, &c, r);
}

/* FORGET on the hiprio queue: the lookups the step's LOOKUP and CREATE made. */
static bool fs_forget(struct vdev *v, u64 nodeid, struct result *r)
{
    struct fuse_forget_in *in = (struct fuse_forget_in *)fs_arg;
    struct fs_call c;
    call_init(&c, "FORGET", FUSE_FORGET, nodeid, sizeof(*in));
    c.queue = 0;
    c.no_reply = true;
    in->nlookup = 1;
    return fs_do(v, &c, r);
}

static u64 fnv_of(u8 *buf, u64 len)
{
    struct buf_job j;
    j.op = BUF_FNV;
    j.addr = (u64)buf;
    j.addr2 = 0;
    j.len = len;
    j.sector = 0;
    run_user(user_buf, &j);
    return j.hash;
}

/* LOOKUP, OPEN, READ until EOF, RELEASE of the host's file; prints its hash. */
static bool fs_read_file(struct vdev *v, u32 chunk, u64 *node, u64 *total, struct result *r)
{
    struct fuse_entry_out e;
    struct line l;
    u64 fh, size, start, round;
    u32 got;

    if (!fs_lookup(v, cfg.fs_read, cfg.fs_read_len, &e, r))
        return false;
    *node = e.nodeid;
    size = e.attr.size;
    if ((e.attr.mode & L_S_IFMT) != L_S_IFREG) {
        res_str(r, "LOOKUP: not a regular file, mode ");
        res_hex(r, e.attr.mode);
        return fs_fail(r, v, "");
    }
    if (size > FS_FILE_MAX) {
        res_str(r, "LOOKUP: the file has ");
        res_dec(r, size);
        res_str(r, " bytes, more than ");
        res_dec(r, FS_FILE_MAX);
        return fs_fail(r, v, "");
    }
    if (!fs_open(v, e.nodeid, L_O_RDONLY, &fh, r))
        return false;
    /* Until a short read (EOF); the buffer's end bounds it whatever the server says.
     * fs_rounds reads the file that many times (timed, for benchmarks). */
    start = rdtsc();
    for (round = 0; round < cfg.fs_rounds; round++) {
        *total = 0;
        for (;;) {
            u32 ask = FS_FILE_MAX - *total < chunk ? (u32)(FS_FILE_MAX - *total) : chunk;
            if (!ask)
                break;
            if (!fs_io(v, e.nodeid, fh, L_O_RDONLY, *total, fs_data + *total, ask, false, &got,
                       r))
                return false;
            *total += got;
            if (got < ask)
                break;
        }
    }
    fs_read_tsc = rdtsc() - start;
    if (!fs_close_op(v, FUSE_RELEASE, e.nodeid, fh, L_O_RDONLY, r))
        return false;
    if (*total != size) {
        res_str(r, "READ gave ");
        res_dec(r, *total);
        res_str(r, " bytes, LOOKUP said ");
        res_dec(r, size);
        return fs_fail(r, v, "");
    }
    line_begin(&l);
    line_str(&l, "fs read name=");
    line_strn(&l, cfg.fs_read, cfg.fs_read_len);
    line_str(&l, " len=");
    line_dec(&l, *total);
    line_str(&l, " fnv=0x");
    line_hexpad(&l, fnv_of(fs_data, *total), 16);
    line_end(&l);
    return true;
}

/*
 * CREATE (O_WRONLY | O_CREAT | O_TRUNC, 0644), WRITE fs_bytes of the blk
 * step's sector pattern, FSYNC, FLUSH, RELEASE, then GETATTR for the size.
 */
static bool fs_write_file(struct vdev *v, u32 chunk, u64 *node, struct result *r)
{
    struct fuse_create_in *in = (struct fuse_create_in *)fs_arg;
    const u32 flags = L_O_WRONLY | L_O_CREAT | L_O_TRUNC;
    u8 *buf = fs_data + FS_FILE_MAX;
    struct buf_job j;
    struct fs_call c;
    struct line l;
    u64 nodeid, fh, off, start, round;
    u32 done;

    call_init(&c, "CREATE", FUSE_CREATE, FUSE_ROOT_ID, sizeof(*in));
    in->flags = flags;
    in->mode = L_S_IFREG | 0644;
    in->umask = 0;
    c.arg2 = fs_name;
    c.arg2_len = set_name(cfg.fs_write, cfg.fs_write_len);
    c.reply = &fs_reply.create;
    c.reply_len = sizeof(fs_reply.create);
    if (!fs_do(v, &c, r) || !reply_has(r, v, &c, sizeof(fs_reply.create)))
        return false;
    nodeid = *node = fs_reply.create.entry.nodeid;
    fh = fs_reply.create.open.fh;
    if (!nodeid)
        return fs_fail(r, v, "CREATE gave node id 0");

    j.op = BUF_FILL;
    j.addr = (u64)buf;
    j.addr2 = 0;
    j.len = cfg.fs_bytes;
    j.sector = 0;
    run_user(user_buf, &j);
    start = rdtsc();
    for (round = 0; round < cfg.fs_rounds; round++) {
        for (off = 0; off < cfg.fs_bytes; off += done) {
            u32 n = cfg.fs_bytes - off < chunk ? (u32)(cfg.fs_bytes - off) : chunk;
            if (!fs_io(v, nodeid, fh, flags, off, buf + off, n, true, &done, r))
                return false;
        }
    }
    fs_write_tsc = rdtsc() - start;
    if (!fs_close_op(v, FUSE_FSYNC, nodeid, fh, flags, r) ||
        !fs_close_op(v, FUSE_FLUSH, nodeid, fh, flags, r) ||
        !fs_close_op(v, FUSE_RELEASE, nodeid, fh, flags, r))
        return false;
    line_begin(&l);
    line_str(&l, "fs write name=");
    line_strn(&l, cfg.fs_write, cfg.fs_write_len);
    line_str(&l, " len=");
    line_dec(&l, cfg.fs_bytes);
    line_str(&l, " fsync=1");
    line_end(&l);

    call_init(&c, "GETATTR", FUSE_GETATTR, nodeid, sizeof(struct fuse_getattr_in));
    c.reply = &fs_reply.attr;
    c.reply_len = sizeof(fs_reply.attr);
    if (!fs_do(v, &c, r) || !reply_has(r, v, &c, sizeof(fs_reply.attr)))
        return false;
    line_begin(&l);
    line_str(&l, "fs attr name=");
    line_strn(&l, cfg.fs_write, cfg.fs_write_len);
    line_str(&l, " size=");
    line_dec(&l, fs_reply.attr.attr.size);
    line_str(&l, " mode=");
    line_hex(&l, fs_reply.attr.attr.mode);
    line_end(&l);
    if (fs_reply.attr.attr.size != cfg.fs_bytes) {
        res_str(r, "GETATTR size ");
        res_dec(r, fs_reply.attr.attr.size);
        res_str(r, " after writing ");
        res_dec(r, cfg.fs_bytes);
        return fs_fail(r, v, " bytes");
    }
    return true;
}

/* fs_rounds > 1: how long the READ and WRITE loops took, for benchmarks. */
static void fs_bench_line(u64 read_len, u32 chunk)
{
    struct line l;
    line_begin(&l);
    line_str(&l, "fs bench rounds=");
    line_dec(&l, cfg.fs_rounds);
    line_str(&l, " chunk=");
    line_dec(&l, chunk);
    line_str(&l, " read_bytes=");
    line_dec(&l, read_len * cfg.fs_rounds);
    line_str(&l, " read_tsc=");
    line_dec(&l, fs_read_tsc);
    line_str(&l, " write_bytes=");
    line_dec(&l, cfg.fs_bytes * cfg.fs_rounds);
    line_str(&l, " write_tsc=");
    line_dec(&l, fs_write_tsc);
    if (tsc_khz) {
        line_str(&l, " read_ns=");
        line_dec(&l, fs_read_tsc * 1000000 / tsc_khz);
        line_str(&l, " write_ns=");
        line_dec(&l, fs_write_tsc * 1000000 / tsc_khz);
    }
    line_end(&l);
}

static bool fs_run(struct vdev *v, struct result *r)
{
    char tag[FS_TAG_LEN];
    u32 tag_len, nreq, max_write, chunk;
    u64 host_node, guest_node, read_len = 0;
    struct line l;

    if (!virtio_init(v, 0, r))
        return false;
    if (!v->devcfg || v->devcfg_len < FS_CFG_LEN)
        return fs_fail(r, v, "no usable virtio-fs device config");
    if (!read_tag(v, tag, &tag_len, &nreq, r))
        return false;
    line_begin(&l);
    line_str(&l, "fs tag=");
    line_strn(&l, tag, tag_len);
    line_str(&l, " request_queues=");
    line_dec(&l, nreq);
    line_str(&l, " bdf=");
    line_bdf(&l, v->pci);
    line_end(&l);
    if (!tag_len)
        return fs_fail(r, v, "empty tag");
    if (!nreq)
        return fs_fail(r, v, "num_request_queues is 0");
    if (!virtio_queues(v, 2, 0, 0, r)) /* hiprio and request queue 0 */
        return false;

    if (!fs_init(v, &max_write, r))
        return false;
    chunk = max_write < FS_CHUNK ? max_write : FS_CHUNK;
    if (!fs_read_file(v, chunk, &host_node, &read_len, r) ||
        !fs_write_file(v, chunk, &guest_node, r))
        return false;
    if (!fs_forget(v, host_node, r) || !fs_forget(v, guest_node, r))
        return false;
    if (cfg.fs_rounds > 1)
        fs_bench_line(read_len, chunk);
    res_kv_dec(r, "read", read_len);
    res_kv_dec(r, "written", cfg.fs_bytes);
    return virtio_check_status(v, r);
}

static bool name_ok(const char *s, size_t n)
{
    size_t i;
    if (!n || n > FS_NAME_MAX || word_eq(s, n, ".") || word_eq(s, n, ".."))
        return false;
    for (i = 0; i < n; i++)
        if (s[i] == '/')
            return false;
    return true;
}

bool step_fs(struct result *r)
{
    struct vdev *vs[1];
    bool ok;
    int n;

    if (cfg.fs_bad || cfg.fs_bytes % 512 || cfg.fs_bytes > FS_FILE_MAX) {
        res_str(r, "bad fs_bytes value");
        return false;
    }
    if (!name_ok(cfg.fs_read, cfg.fs_read_len) || !name_ok(cfg.fs_write, cfg.fs_write_len)) {
        res_str(r, "bad fs_read or fs_write name");
        return false;
    }
    n = virtio_find(VIRTIO_ID_FS, vs, 1, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-fs device");
        return false;
    }
    if (!fs_data) {
        fs_data = alloc_pages(2 * FS_FILE_MAX / 4096);
        if (!fs_data) {
            res_str(r, "out of memory for the fs buffers");
            return false;
        }
    }
    ok = fs_run(vs[0], r);
    virtio_stop(vs[0]);
    return ok;
}
