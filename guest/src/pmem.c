/*
 * virtio-pmem: the pmem step. For every virtio-pmem device: its region from
 * the config space (start, size), the FNV-1a of pmem_bytes at pmem_offset as
 * found, then the blk step's sector pattern written there (sector =
 * pmem_offset / 512 onwards), read back and compared, then a FLUSH. The
 * region is mapped user-accessible: the byte loops run at CPL3 (user.c).
 */
#include "pci.h"

#define PMEM_REQ_FLUSH 0
#define REQ_TIMEOUT_MS 2000

static u32 pmem_req;
static u32 pmem_status;

static bool pmem_fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    res_vdev(r, v);
    return false;
}

static void run_job(struct buf_job *j, u32 op, u64 addr, u64 len, u64 sector)
{
    j->op = op;
    j->addr = addr;
    j->addr2 = 0;
    j->len = len;
    j->sector = sector;
    run_user(user_buf, j);
}

static bool pmem_one(struct vdev *v, struct result *r)
{
    struct buf_job j;
    struct vbuf b[2];
    struct line l;
    u64 start, size, at, sector = cfg.pmem_offset / 512, hash;
    u32 len, tries;

    if (!virtio_init(v, 0, r))
        return false;
    if (!v->devcfg || v->devcfg_len < 16)
        return pmem_fail(r, v, "no usable virtio-pmem device config");
    for (tries = 0;; tries++) {
        u8 gen = virtio_cfg_gen(v);
        start = (u64)virtio_cfg32(v, 0) | (u64)virtio_cfg32(v, 4) << 32;
        size = (u64)virtio_cfg32(v, 8) | (u64)virtio_cfg32(v, 12) << 32;
        if (virtio_cfg_gen(v) == gen)
            break;
        if (tries == 10)
            return pmem_fail(r, v, "config generation keeps changing");
    }
    if (cfg.pmem_offset + cfg.pmem_bytes > size)
        return pmem_fail(r, v, "pmem_offset + pmem_bytes past the region");
    at = start + cfg.pmem_offset;
    if (!map_mmio(at, cfg.pmem_bytes, true) || !user_mapped(at, cfg.pmem_bytes))
        return pmem_fail(r, v, "cannot map the region");
    if (!virtio_queues(v, 1, 0, 0, r))
        return false;

    run_job(&j, BUF_FNV, at, cfg.pmem_bytes, 0);
    hash = j.hash;
    line_begin(&l);
    line_str(&l, "pmem dev bdf=");
    line_bdf(&l, v->pci);
    line_str(&l, " start=");
    line_hex(&l, start);
    line_str(&l, " size=");
    line_hex(&l, size);
    line_str(&l, " fnv=");
    line_hex(&l, hash);
    line_end(&l);

    run_job(&j, BUF_FILL, at, cfg.pmem_bytes, sector);
    run_job(&j, BUF_CHECK, at, cfg.pmem_bytes, sector);
    if (j.bad) {
        res_str(r, "read back ");
        res_hex(r, j.found);
        res_str(r, " expected ");
        res_hex(r, j.expected);
        res_str(r, " at offset ");
        res_hex(r, cfg.pmem_offset + j.bad_off);
        return pmem_fail(r, v, "");
    }

    pmem_req = PMEM_REQ_FLUSH;
    pmem_status = 0xff;
    b[0].addr = (u64)&pmem_req;
    b[0].len = 4;
    b[0].write = false;
    b[1].addr = (u64)&pmem_status;
    b[1].len = 4;
    b[1].write = true;
    if (!vq_submit(v, &v->q[0], b, 2, r) || !vq_wait(v, &v->q[0], &len, REQ_TIMEOUT_MS, r))
        return false;
    if (len != 4 || pmem_status != 0) {
        res_str(r, "flush status ");
        res_dec(r, pmem_status);
        res_str(r, " len ");
        res_dec(r, len);
        return pmem_fail(r, v, "");
    }
    line_begin(&l);
    line_str(&l, "pmem write bdf=");
    line_bdf(&l, v->pci);
    line_str(&l, " offset=");
    line_dec(&l, cfg.pmem_offset);
    line_str(&l, " bytes=");
    line_dec(&l, cfg.pmem_bytes);
    line_str(&l, " verified=1 flushed=1");
    line_end(&l);
    return virtio_check_status(v, r);
}

bool step_pmem(struct result *r)
{
    struct vdev *vs[VDEV_MAX];
    int n, i;

    if (cfg.pmem_bad || !cfg.pmem_bytes || cfg.pmem_bytes % 512 || cfg.pmem_offset % 512 ||
        cfg.pmem_bytes > (1u << 20)) {
        res_str(r, "bad pmem_offset or pmem_bytes value");
        return false;
    }
    n = virtio_find(VIRTIO_ID_PMEM, vs, VDEV_MAX, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-pmem device");
        return false;
    }
    for (i = 0; i < n; i++) {
        bool ok = pmem_one(vs[i], r);
        virtio_stop(vs[i]);
        if (!ok)
            return false;
    }
    res_kv_dec(r, "devices", (u64)n);
    return true;
}
