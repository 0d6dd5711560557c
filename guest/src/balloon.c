/*
 * virtio-balloon: the balloon step. Takes balloon_mib MiB of RAM and writes
 * every page of it (so the host backs it), prints "balloon ready", then
 * follows the host's target (num_pages in the config space) until the
 * balloon has grown and come back to empty. Inflating sends 4 KiB page
 * numbers on the inflate queue, deflating on the deflate queue and then
 * writes those pages again; after each batch the driver's `actual` is
 * updated. Reaching a target prints "balloon actual=<pages>".
 */
#include "pci.h"

#define BALLOON_BATCH 256
#define REQ_TIMEOUT_MS 2000

static u32 balloon_pfns[BALLOON_BATCH];

static bool balloon_fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    res_vdev(r, v);
    return false;
}

/* Pages [first, first + n) of the pool on queue q (0 inflate, 1 deflate). */
static bool balloon_send(struct vdev *v, u16 q, u8 *pool, u32 first, u32 n, struct result *r)
{
    struct vbuf b;
    u32 i, len;
    for (i = 0; i < n; i++)
        balloon_pfns[i] = (u32)(((u64)pool >> 12) + first + i);
    b.addr = (u64)balloon_pfns;
    b.len = n * 4;
    b.write = false;
    return vq_submit(v, &v->q[q], &b, 1, r) && vq_wait(v, &v->q[q], &len, REQ_TIMEOUT_MS, r);
}

static void balloon_touch(u8 *pool, u32 first, u32 n)
{
    u32 i;
    for (i = 0; i < n; i++)
        *(volatile u64 *)(pool + ((u64)first + i) * 4096) = 0x42414c4c4f4f4e00ULL | i;
}

static bool balloon_run(struct vdev *v, struct result *r)
{
    u32 pool_pages = (u32)(cfg.balloon_mib * 256), actual = 0, target, max_seen = 0;
    u32 reported = 0xffffffff;
    u64 deadline = rdtsc() + ms_to_tsc(cfg.balloon_timeout_ms);
    struct line l;
    u8 *pool;

    if (!virtio_init(v, 0, r))
        return false;
    if (!v->devcfg || v->devcfg_len < 8)
        return balloon_fail(r, v, "no usable virtio-balloon device config");
    if (!virtio_queues(v, 2, 0, 0, r))
        return false;
    v->q[0].lax_len = v->q[1].lax_len = cfg.balloon_lax_len != 0;
    pool = alloc_pages(pool_pages);
    if (!pool)
        return balloon_fail(r, v, "not enough RAM for balloon_mib");
    balloon_touch(pool, 0, pool_pages);
    wr32(v->devcfg + 4, 0);
    line_begin(&l);
    line_str(&l, "balloon ready pages=");
    line_dec(&l, pool_pages);
    line_end(&l);

    for (;;) {
        u32 n;
        target = virtio_cfg32(v, 0);
        if (target > pool_pages)
            target = pool_pages;
        if (target > actual) {
            n = target - actual < BALLOON_BATCH ? target - actual : BALLOON_BATCH;
            if (!balloon_send(v, 0, pool, actual, n, r))
                return false;
            actual += n;
            wr32(v->devcfg + 4, actual);
        } else if (target < actual) {
            n = actual - target < BALLOON_BATCH ? actual - target : BALLOON_BATCH;
            if (!balloon_send(v, 1, pool, actual - n, n, r))
                return false;
            balloon_touch(pool, actual - n, n);
            actual -= n;
            wr32(v->devcfg + 4, actual);
        } else {
            if (actual != reported) {
                reported = actual;
                line_begin(&l);
                line_str(&l, "balloon actual=");
                line_dec(&l, actual);
                line_end(&l);
            }
            if (actual > max_seen)
                max_seen = actual;
            if (max_seen && !actual)
                break;
            if (rdtsc() > deadline) {
                res_str(r, "timeout after ");
                res_dec(r, cfg.balloon_timeout_ms);
                res_str(r, " ms actual=");
                res_dec(r, actual);
                return balloon_fail(r, v, "");
            }
            cpu_relax();
        }
    }
    res_kv_dec(r, "pages", max_seen);
    return virtio_check_status(v, r);
}

bool step_balloon(struct result *r)
{
    struct vdev *v;
    int n;
    bool ok;

    if (cfg.balloon_bad || !cfg.balloon_mib || cfg.balloon_mib > 4096) {
        res_str(r, "bad balloon_mib or balloon_timeout_ms value");
        return false;
    }
    n = virtio_find(VIRTIO_ID_BALLOON, &v, 1, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-balloon device");
        return false;
    }
    ok = balloon_run(v, r);
    virtio_stop(v);
    return ok;
}
