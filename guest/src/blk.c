/*
 * virtio-blk: the blk step (config, GET_ID, read, write/flush/verify or the
 * read-only check, one read on every queue) and blkbench (a polling driver
 * that runs at CPL3, see user.c). Byte loops (FNV, pattern, compare) run
 * at CPL3 as well.
 */
#include "pci.h"

#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define VIRTIO_BLK_F_MQ (1ULL << 12)

#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2

#define BLK_COUNT_MAX 2048  /* sectors per blk_count (1 MiB buffers) */
#define BLK_CHUNK 128       /* sectors per request */
#define BLK_TIMEOUT_MS 2000

struct blk_hdr {
    u32 type;
    u32 reserved;
    u64 sector;
};

/* Request headers and status bytes, one per queue (the image is identity-mapped RAM). */
static struct blk_hdr req_hdr[VQ_MAX];
static volatile u8 req_status[VQ_MAX];
static char blk_id[24];

/* Two data buffers of blk_count sectors, allocated once (grown if needed). */
static u8 *buf_a, *buf_b;
static u64 buf_sectors;

struct disk {
    struct vdev *v;
    u64 capacity;
    u16 queues; /* num_queues from the config, or 1 */
    bool ro, flush;
};

static bool blk_fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    res_vdev(r, v);
    return false;
}

/* Puts one request on queue qi (header, optional data, status byte) and notifies. */
bool blk_submit(struct vdev *v, u16 qi, u32 type, u64 sector, void *buf, u32 len, struct result *r)
{
    struct vbuf b[3];
    u32 n = 0;
    req_hdr[qi].type = type;
    req_hdr[qi].reserved = 0;
    req_hdr[qi].sector = sector;
    req_status[qi] = 0xff; /* stays so if the device writes no status */
    b[n].addr = (u64)&req_hdr[qi];
    b[n].len = sizeof(req_hdr[qi]);
    b[n++].write = false;
    if (len) {
        b[n].addr = (u64)buf;
        b[n].len = len;
        b[n++].write = type != BLK_T_OUT;
    }
    b[n].addr = (u64)&req_status[qi];
    b[n].len = 1;
    b[n++].write = true;
    return vq_submit(v, &v->q[qi], b, n, r);
}

u8 blk_status(u16 qi) { return req_status[qi]; }

/* One request, waited for; *st is the status byte the device wrote (0xff: none). */
static bool blk_io(struct vdev *v, u16 qi, u32 type, u64 sector, void *buf, u32 len, u8 *st,
                   struct result *r)
{
    u32 used;
    if (!blk_submit(v, qi, type, sector, buf, len, r) || !vq_wait(v, &v->q[qi], &used, BLK_TIMEOUT_MS, r))
        return false;
    *st = req_status[qi];
    return true;
}

/* Reads or writes [sector, sector+count) in BLK_CHUNK pieces; stops at the first bad status. */
static bool blk_rw(struct vdev *v, u16 qi, u32 type, u64 sector, u64 count, u8 *buf, u8 *st,
                   struct result *r)
{
    u64 done = 0;
    *st = BLK_S_OK;
    while (done < count) {
        u64 k = count - done < BLK_CHUNK ? count - done : BLK_CHUNK;
        if (!blk_io(v, qi, type, sector + done, buf + done * 512, (u32)(k * 512), st, r))
            return false;
        if (*st != BLK_S_OK)
            return true;
        done += k;
    }
    return true;
}

static bool status_fail(struct result *r, const struct vdev *v, const char *what, u64 sector, u8 st)
{
    res_str(r, what);
    res_str(r, " sector=");
    res_dec(r, sector);
    res_str(r, " status=");
    res_dec(r, st);
    return blk_fail(r, v, "");
}

/* Config space (capacity, num_queues), read until the generation is stable. */
static bool blk_config(struct disk *k, struct result *r)
{
    struct vdev *v = k->v;
    bool mq = v->features & VIRTIO_BLK_F_MQ;
    u32 tries;

    if (!v->devcfg || v->devcfg_len < (mq ? 36u : 8u))
        return blk_fail(r, v, "no usable virtio-blk device config");
    for (tries = 0;; tries++) {
        u8 gen = virtio_cfg_gen(v);
        k->capacity = virtio_cfg32(v, 0) | (u64)virtio_cfg32(v, 4) << 32;
        k->queues = mq ? virtio_cfg16(v, 34) : 1;
        if (virtio_cfg_gen(v) == gen)
            break;
        if (tries == 10)
            return blk_fail(r, v, "config generation keeps changing");
    }
    if (!k->queues)
        return blk_fail(r, v, "num_queues is 0");
    k->ro = v->features & VIRTIO_BLK_F_RO;
    k->flush = v->features & VIRTIO_BLK_F_FLUSH;
    return true;
}

/* Negotiates (RO, FLUSH, MQ + extra) and reads the config. */
static bool blk_init(struct disk *k, u64 extra, struct result *r)
{
    return virtio_init(k->v, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_MQ | extra, r) &&
           blk_config(k, r);
}

/* blk_init, then min(queues, VQ_MAX) queues (or just queue 0), polled. */
static bool blk_open(struct disk *k, u64 extra, bool all_queues, struct result *r)
{
    u16 nq;
    if (!blk_init(k, extra, r))
        return false;
    nq = all_queues ? (k->queues < VQ_MAX ? k->queues : VQ_MAX) : 1;
    return virtio_queues(k->v, nq, 0, 0, r);
}

bool blk_negotiate(struct vdev *v, u16 *nq, struct result *r)
{
    struct disk k;
    memset(&k, 0, sizeof(k));
    k.v = v;
    if (!blk_init(&k, 0, r))
        return false;
    *nq = k.queues < VQ_MAX ? k.queues : VQ_MAX;
    return true;
}

static bool run_buf(struct buf_job *j, u32 op, u8 *a, u8 *b, u64 len, u64 sector)
{
    j->op = op;
    j->addr = (u64)a;
    j->addr2 = (u64)b;
    j->len = len;
    j->sector = sector;
    run_user(user_buf, j);
    return !j->bad;
}

static bool mismatch(struct result *r, const struct vdev *v, const char *what, const struct buf_job *j,
                     u64 sector)
{
    res_str(r, what);
    res_str(r, " mismatch at sector ");
    res_dec(r, sector + j->bad_off / 512);
    res_str(r, " qword ");
    res_dec(r, (j->bad_off % 512) / 8);
    res_str(r, " expected ");
    res_hex(r, j->expected);
    res_str(r, " found ");
    res_hex(r, j->found);
    return blk_fail(r, v, "");
}

static void print_dev(const struct disk *k)
{
    struct line l;
    u32 i;
    line_begin(&l);
    line_str(&l, "blk dev bdf=");
    line_bdf(&l, k->v->pci);
    line_str(&l, " capacity=");
    line_dec(&l, k->capacity);
    line_str(&l, " ro=");
    line_dec(&l, k->ro);
    line_str(&l, " queues=");
    line_dec(&l, k->queues);
    line_str(&l, " serial=");
    for (i = 0; i < 20 && blk_id[i]; i++) /* keep the line one word: no spaces or controls */
        line_char(&l, blk_id[i] > ' ' && blk_id[i] < 0x7f ? blk_id[i] : '?');
    line_end(&l);
}

static bool blk_disk(struct disk *k, struct result *r)
{
    struct vdev *v = k->v;
    u64 s = cfg.blk_sector, n = cfg.blk_count, len = n * 512;
    struct buf_job j;
    struct line l;
    u8 st;
    u16 qi;

    if (!blk_open(k, 0, true, r))
        return false;
    /* Serial: 20 bytes, NUL-padded; devices without GET_ID answer UNSUPP. */
    memset(blk_id, 0, sizeof(blk_id));
    if (!blk_io(v, 0, BLK_T_GET_ID, 0, blk_id, 20, &st, r))
        return false;
    if (st != BLK_S_OK && st != BLK_S_UNSUPP && st != BLK_S_IOERR)
        return status_fail(r, v, "GET_ID", 0, st);
    if (st != BLK_S_OK)
        memset(blk_id, 0, sizeof(blk_id));
    print_dev(k);

    if (s > k->capacity || n > k->capacity - s) {
        res_str(r, "sectors ");
        res_dec(r, s);
        res_str(r, "+");
        res_dec(r, n);
        res_str(r, " beyond capacity ");
        res_dec(r, k->capacity);
        return blk_fail(r, v, "");
    }

    if (!blk_rw(v, 0, BLK_T_IN, s, n, buf_a, &st, r))
        return false;
    if (st != BLK_S_OK)
        return status_fail(r, v, "read", s, st);
    run_buf(&j, BUF_FNV, buf_a, NULL, len, s);
    line_begin(&l);
    line_str(&l, "blk read bdf=");
    line_bdf(&l, v->pci);
    line_str(&l, " sector=");
    line_dec(&l, s);
    line_str(&l, " count=");
    line_dec(&l, n);
    line_str(&l, " fnv=0x");
    line_hexpad(&l, j.hash, 16);
    line_end(&l);

    /* Write the pattern; on a read-only disk the write must fail and change nothing. */
    run_buf(&j, BUF_FILL, buf_b, NULL, len, s);
    if (!blk_rw(v, 0, BLK_T_OUT, s, n, buf_b, &st, r))
        return false;
    if (k->ro) {
        u8 wst = st;
        if (wst == BLK_S_OK)
            return blk_fail(r, v, "write to a read-only disk succeeded");
        if (wst != BLK_S_IOERR && wst != BLK_S_UNSUPP)
            return status_fail(r, v, "write to a read-only disk", s, wst);
        run_buf(&j, BUF_NOT, buf_b, buf_a, len, s); /* a read that delivers nothing must not match */
        if (!blk_rw(v, 0, BLK_T_IN, s, n, buf_b, &st, r))
            return false;
        if (st != BLK_S_OK)
            return status_fail(r, v, "read", s, st);
        if (!run_buf(&j, BUF_CMP, buf_b, buf_a, len, s))
            return mismatch(r, v, "read-only data changed:", &j, s);
        line_begin(&l);
        line_str(&l, "blk readonly bdf=");
        line_bdf(&l, v->pci);
        line_str(&l, " write_status=");
        line_dec(&l, wst);
        line_str(&l, " unchanged=1");
        line_end(&l);
    } else {
        if (st != BLK_S_OK)
            return status_fail(r, v, "write", s, st);
        if (k->flush) {
            if (!blk_io(v, 0, BLK_T_FLUSH, 0, NULL, 0, &st, r))
                return false;
            if (st != BLK_S_OK)
                return status_fail(r, v, "flush", 0, st);
        }
        run_buf(&j, BUF_ZERO, buf_b, NULL, len, s); /* so a read that delivers nothing fails */
        if (!blk_rw(v, 0, BLK_T_IN, s, n, buf_b, &st, r))
            return false;
        if (st != BLK_S_OK)
            return status_fail(r, v, "read back", s, st);
        if (!run_buf(&j, BUF_CHECK, buf_b, NULL, len, s))
            return mismatch(r, v, "read back:", &j, s);
        line_begin(&l);
        line_str(&l, "blk write bdf=");
        line_bdf(&l, v->pci);
        line_str(&l, " sector=");
        line_dec(&l, s);
        line_str(&l, " count=");
        line_dec(&l, n);
        line_str(&l, " flushed=");
        line_dec(&l, k->flush);
        line_str(&l, " verified=1");
        line_end(&l);
    }

    /* Every other queue: one read of (the start of) the range, checked. */
    for (qi = 1; qi < v->nq; qi++) {
        u64 c = n < BLK_CHUNK ? n : BLK_CHUNK;
        if (k->ro)
            run_buf(&j, BUF_NOT, buf_b, buf_a, c * 512, s);
        else
            run_buf(&j, BUF_ZERO, buf_b, NULL, c * 512, s);
        if (!blk_rw(v, qi, BLK_T_IN, s, c, buf_b, &st, r))
            return false;
        if (st != BLK_S_OK)
            return status_fail(r, v, "read on another queue", s, st);
        if (k->ro ? !run_buf(&j, BUF_CMP, buf_b, buf_a, c * 512, s)
                  : !run_buf(&j, BUF_CHECK, buf_b, NULL, c * 512, s))
            return mismatch(r, v, "read on another queue:", &j, s);
    }
    return true;
}

static bool alloc_bufs(u64 sectors, struct result *r)
{
    u64 pages = ALIGN_UP(sectors * 512, 4096) / 4096;
    if (sectors <= buf_sectors)
        return true;
    buf_a = alloc_pages(pages);
    buf_b = buf_a ? alloc_pages(pages) : NULL;
    if (!buf_b || !user_mapped((u64)buf_a, pages * 4096) || !user_mapped((u64)buf_b, pages * 4096)) {
        buf_sectors = 0;
        res_str(r, "no memory for the blk buffers");
        return false;
    }
    buf_sectors = sectors;
    return true;
}

bool step_blk(struct result *r)
{
    struct vdev *vs[VDEV_MAX];
    int n, i;

    if (cfg.blk_bad || !cfg.blk_count || cfg.blk_count > BLK_COUNT_MAX) {
        res_str(r, "bad blk_sector or blk_count value (count 1-2048)");
        return false;
    }
    n = virtio_find(VIRTIO_ID_BLK, vs, VDEV_MAX, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-blk device");
        return false;
    }
    if (!alloc_bufs(cfg.blk_count, r))
        return false;
    for (i = 0; i < n; i++) {
        struct disk k;
        bool ok;
        memset(&k, 0, sizeof(k));
        k.v = vs[i];
        ok = blk_disk(&k, r);
        virtio_stop(vs[i]);
        if (!ok)
            return false;
    }
    res_kv_dec(r, "disks", (u64)n);
    return true;
}

/* ---- blkbench ---- */

static struct bench_job bench;
static u8 *bench_mem, *bench_data;
static u64 bench_mem_depth, bench_data_bytes;

static const char *const bench_modes[] = {"read", "write", "randread"};

static bool bench_alloc(u64 depth, u64 size, struct result *r)
{
    /* headers 16 + status 4 + indirect table 48 + in-flight flag 1, per slot */
    u64 mem_pages = ALIGN_UP(depth * 69, 4096) / 4096, data_pages = ALIGN_UP(depth * size, 4096) / 4096;
    if (depth > bench_mem_depth) {
        bench_mem = alloc_pages(mem_pages);
        bench_mem_depth = bench_mem ? depth : 0;
    }
    if (depth * size > bench_data_bytes) {
        bench_data = alloc_pages(data_pages);
        bench_data_bytes = bench_data ? depth * size : 0;
    }
    if (!bench_mem || !bench_data || !bench_mem_depth || !bench_data_bytes ||
        !user_mapped((u64)bench_mem, mem_pages * 4096) || !user_mapped((u64)bench_data, data_pages * 4096)) {
        res_str(r, "no memory for ");
        res_dec(r, depth * size);
        res_str(r, " bytes of blkbench buffers");
        return false;
    }
    bench.hdrs = (u64)bench_mem;
    bench.tables = bench.hdrs + 16 * depth;
    bench.status = bench.tables + 48 * depth;
    /* 4 bytes per status: Cloud Hypervisor v37 writes the status as a le32. */
    bench.inflight = (u8 *)(bench.status + 4 * depth);
    bench.data = (u64)bench_data;
    return true;
}

/* The first read-write disk; for read modes the first read-only one if none is. */
static bool bench_pick(struct disk *k, bool need_rw, struct result *r)
{
    struct vdev *vs[VDEV_MAX];
    int n, i, ro = -1;

    n = virtio_find(VIRTIO_ID_BLK, vs, VDEV_MAX, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-blk device");
        return false;
    }
    for (i = 0; i < n; i++) {
        memset(k, 0, sizeof(*k));
        k->v = vs[i];
        if (!virtio_init(k->v, VIRTIO_BLK_F_RO, r))
            return false;
        virtio_stop(k->v);
        if (!(k->v->features & VIRTIO_BLK_F_RO))
            return true;
        if (ro < 0)
            ro = i;
    }
    if (need_rw) {
        res_str(r, "no read-write virtio-blk disk for blkbench_mode=write");
        return false;
    }
    memset(k, 0, sizeof(*k));
    k->v = vs[ro];
    return true;
}

static bool bench_error(struct result *r, const struct vdev *v)
{
    switch (bench.err) {
    case BENCH_TIMEOUT:
        res_str(r, "timeout: no completion for ");
        res_dec(r, cfg.bench_stall_ms);
        res_str(r, " ms after ");
        res_dec(r, bench.done);
        res_str(r, " requests");
        break;
    case BENCH_BAD_ID:
        res_str(r, "used id ");
        res_dec(r, bench.err_a);
        res_str(r, " is not a request in flight");
        break;
    case BENCH_BAD_LEN:
        res_str(r, "used len ");
        res_dec(r, bench.err_a);
        res_str(r, " exceeds the writable ");
        res_dec(r, bench.err_b);
        break;
    case BENCH_BAD_STATUS:
        res_str(r, "request status ");
        res_dec(r, bench.err_a);
        res_str(r, " at sector ");
        res_dec(r, bench.err_b);
        break;
    default:
        res_str(r, "used idx moved from ");
        res_dec(r, bench.err_a);
        res_str(r, " to ");
        res_dec(r, bench.err_b);
        res_str(r, ", past the requests in flight");
        break;
    }
    return blk_fail(r, v, "");
}

bool step_blkbench(struct result *r)
{
    struct disk k;
    struct virtq *q;
    u32 mode;
    u64 max_depth;
    bool ok;

    memset(&k, 0, sizeof(k));
    for (mode = 0; mode < ARRAY_SIZE(bench_modes); mode++)
        if (word_eq(cfg.bench_mode, cfg.bench_mode_len, bench_modes[mode]))
            break;
    if (mode == ARRAY_SIZE(bench_modes)) {
        res_str(r, "bad blkbench_mode value (read, write or randread)");
        return false;
    }
    if (cfg.bench_bad || !cfg.bench_size || cfg.bench_size % 512 || cfg.bench_size > 4 * MiB ||
        !cfg.bench_depth || !cfg.bench_count) {
        res_str(r, "bad blkbench_size, blkbench_depth or blkbench_count value");
        return false;
    }
    if (!bench_pick(&k, mode == BENCH_WRITE, r) || !blk_open(&k, VIRTIO_F_INDIRECT_DESC, false, r))
        goto fail;
    q = &k.v->q[0];
    bench.indirect = k.v->features & VIRTIO_F_INDIRECT_DESC;
    max_depth = bench.indirect ? q->size : q->size / 3u; /* 3 descriptors per request otherwise */
    if (cfg.bench_depth > max_depth) {
        res_str(r, "blkbench_depth ");
        res_dec(r, cfg.bench_depth);
        res_str(r, " exceeds ");
        res_dec(r, max_depth);
        res_str(r, bench.indirect ? " (queue size)" : " (queue size / 3, no indirect descriptors)");
        goto fail;
    }
    if (cfg.bench_size > k.capacity * 512) {
        res_str(r, "blkbench_size exceeds the disk");
        goto fail;
    }
    if (!bench_alloc(cfg.bench_depth, cfg.bench_size, r))
        goto fail;
    /* CPL3 writes the notify register and the rings itself. */
    if (!map_mmio(q->notify, 2, true) || !user_mapped(q->notify, 2) ||
        !user_mapped((u64)q->mem, 3 * 4096)) {
        blk_fail(r, k.v, "cannot map the notify register or rings for CPL3");
        goto fail;
    }
    bench.desc = q->desc;
    bench.avail = q->avail;
    bench.used = q->used;
    bench.notify = q->notify;
    bench.qindex = q->index;
    bench.qsize = q->size;
    bench.avail_idx = q->avail_idx;
    bench.last_used = q->last_used;
    bench.mode = mode;
    bench.depth = (u32)cfg.bench_depth;
    bench.size = cfg.bench_size;
    bench.count = cfg.bench_count;
    bench.cap_sectors = k.capacity;
    bench.timeout = ms_to_tsc(cfg.bench_stall_ms);
    bench.lax_len = cfg.bench_lax_len != 0;
    run_user(user_blkbench, &bench);
    ok = bench.err == BENCH_OK && virtio_check_status(k.v, r);
    if (bench.err != BENCH_OK)
        bench_error(r, k.v);
    virtio_stop(k.v);
    if (!ok)
        return false;

    res_str(r, " mode=");
    res_str(r, bench_modes[mode]);
    res_kv_dec(r, "size", bench.size);
    res_kv_dec(r, "depth", bench.depth);
    res_kv_dec(r, "requests", bench.done);
    res_kv_dec(r, "tsc", bench.tsc);
    if (tsc_khz) {
        u64 ns = bench.tsc * 1000000 / tsc_khz, us = ns / 1000;
        res_kv_dec(r, "ns", ns);
        res_kv_dec(r, "iops", us ? bench.done * 1000000 / us : 0);
        res_kv_dec(r, "kbps", us ? bench.done * bench.size / 1024 * 1000000 / us : 0);
    }
    return true;
fail:
    if (k.v)
        virtio_stop(k.v);
    return false;
}
