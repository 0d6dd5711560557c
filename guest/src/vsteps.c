/*
 * virtio steps: rng, console, watchdog (polled) and msix (interrupts). blk
 * and blkbench are in blk.c.
 */
#include "pci.h"

#define REQ_TIMEOUT_MS 2000

static u8 rng_buf[64];

/* 64 bytes from one virtio-rng device (it may return fewer per request). */
static bool rng_fill(struct vdev *v, u32 *got, struct result *r)
{
    u32 have = 0, tries, i;
    memset(rng_buf, 0, sizeof(rng_buf));
    for (tries = 0; have < sizeof(rng_buf) && tries < 16; tries++) {
        struct vbuf b;
        u32 len;
        b.addr = (u64)rng_buf + have;
        b.len = (u32)sizeof(rng_buf) - have;
        b.write = true;
        if (!vq_submit(v, &v->q[0], &b, 1, r) || !vq_wait(v, &v->q[0], &len, REQ_TIMEOUT_MS, r))
            return false;
        have += len; /* len <= b.len: vq_poll checked it */
    }
    if (have < sizeof(rng_buf)) {
        res_str(r, "only ");
        res_dec(r, have);
        res_str(r, " of 64 bytes after 16 requests");
        res_vdev(r, v);
        return false;
    }
    for (i = 1; i < have && rng_buf[i] == rng_buf[0]; i++)
        ;
    if (i == have) {
        res_str(r, "all 64 bytes equal ");
        res_hex(r, rng_buf[0]);
        res_vdev(r, v);
        return false;
    }
    *got = have;
    return true;
}

bool step_rng(struct result *r)
{
    struct vdev *vs[VDEV_MAX];
    u64 total = 0;
    int n, i;

    n = virtio_find(VIRTIO_ID_RNG, vs, VDEV_MAX, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-rng device");
        return false;
    }
    for (i = 0; i < n; i++) {
        u32 got = 0;
        bool ok = virtio_start(vs[i], 0, 1, r) && rng_fill(vs[i], &got, r);
        virtio_stop(vs[i]);
        if (!ok)
            return false;
        total += got;
    }
    res_kv_dec(r, "devices", (u64)n);
    res_kv_dec(r, "bytes", total);
    return true;
}

/* ---- watchdog: Cloud Hypervisor's virtio-watchdog, one queue ---- */

static u8 wd_buf;

/*
 * Pets the first watchdog watchdog_pets times, watchdog_pet_ms apart: each pet
 * is a 1-byte device-writable buffer the device sets to 1. The device is left
 * running, so a guest that stops petting afterwards is reset by the host.
 */
bool step_watchdog(struct result *r)
{
    struct vdev *v;
    u64 i, next;
    int n;

    if (cfg.watchdog_bad) {
        res_str(r, "bad watchdog_pets or watchdog_pet_ms value");
        return false;
    }
    n = virtio_find(VIRTIO_ID_WATCHDOG, &v, 1, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-watchdog device");
        return false;
    }
    if (!virtio_start(v, 0, 1, r)) {
        virtio_stop(v);
        return false;
    }
    next = rdtsc();
    for (i = 0; i < cfg.watchdog_pets; i++) {
        struct vbuf b;
        struct line l;
        u32 len;
        if (i) {
            next += ms_to_tsc(cfg.watchdog_pet_ms);
            while (rdtsc() < next)
                __asm__ volatile("pause");
        }
        wd_buf = 0;
        b.addr = (u64)&wd_buf;
        b.len = 1;
        b.write = true;
        if (!vq_submit(v, &v->q[0], &b, 1, r) || !vq_wait(v, &v->q[0], &len, REQ_TIMEOUT_MS, r)) {
            virtio_stop(v);
            return false;
        }
        if (wd_buf != 1) {
            res_str(r, "device wrote ");
            res_hex(r, wd_buf);
            res_str(r, " instead of 1");
            res_vdev(r, v);
            virtio_stop(v);
            return false;
        }
        line_begin(&l);
        line_str(&l, "watchdog pet ");
        line_dec(&l, i);
        line_end(&l);
    }
    res_kv_dec(r, "pets", cfg.watchdog_pets);
    res_vdev(r, v);
    return true;
}

/* ---- console: port 0 without MULTIPORT: receiveq 0, transmitq 1 ---- */

static char con_hello[] = "vmkit-guest: virtio-console hello\n";
static char con_msix[] = "vmkit-guest: virtio-console msix\n";

static bool con_submit(struct vdev *v, char *text, struct result *r)
{
    struct vbuf b;
    b.addr = (u64)text;
    b.len = (u32)strlen(text);
    b.write = false;
    return vq_submit(v, &v->q[1], &b, 1, r);
}

bool step_console(struct result *r)
{
    struct vdev *v;
    u32 len;
    int n;
    bool ok;

    n = virtio_find(VIRTIO_ID_CONSOLE, &v, 1, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-console device");
        return false;
    }
    ok = virtio_start(v, 0, 2, r) && con_submit(v, con_hello, r) &&
         vq_wait(v, &v->q[1], &len, REQ_TIMEOUT_MS, r);
    virtio_stop(v);
    return ok;
}

/* ---- msix: one device per type, a vector per queue and for config ---- */

#define MSIX_DEVS 3
#define MSIX_QUIET_MS 20 /* before the requests: queue vectors that fire are spurious */

struct msix_dev {
    struct vdev *v;
    u32 type;
    u16 nq;
    u16 qfirst, qlast; /* queues that get a request: their vectors must fire */
};

static u8 msix_rng_buf[16];
static u8 *msix_blk_buf; /* one sector per queue */

static bool msix_submit(struct msix_dev *m, u16 qi, struct result *r)
{
    struct vbuf b;
    if (m->type == VIRTIO_ID_RNG) {
        b.addr = (u64)msix_rng_buf;
        b.len = sizeof(msix_rng_buf);
        b.write = true;
        return vq_submit(m->v, &m->v->q[qi], &b, 1, r);
    }
    if (m->type == VIRTIO_ID_BLK)
        return blk_submit(m->v, qi, BLK_T_IN, 0, msix_blk_buf + 512 * qi, 512, r);
    return con_submit(m->v, con_msix, r);
}

/* The completion is there (the interrupt said so) and is sane. */
static bool msix_complete(struct msix_dev *m, u16 qi, struct result *r)
{
    u32 len;
    int k = vq_poll(m->v, &m->v->q[qi], &len, r);
    if (k < 0)
        return false;
    if (k == 0) {
        res_str(r, "interrupt but no used buffer on queue ");
        res_dec(r, qi);
        res_vdev(r, m->v);
        return false;
    }
    if (m->type == VIRTIO_ID_BLK && blk_status(qi) != 0) {
        res_str(r, "read status ");
        res_dec(r, blk_status(qi));
        res_str(r, " on queue ");
        res_dec(r, qi);
        res_vdev(r, m->v);
        return false;
    }
    return virtio_check_status(m->v, r);
}

/* "vector V of queue Q <what>": always false. */
static bool msix_vector_failed(const struct msix_dev *m, u16 qi, const char *what,
                               struct result *r)
{
    res_str(r, "vector ");
    res_hex(r, m->v->irq_base + m->v->q[qi].vector);
    res_str(r, " of queue ");
    res_dec(r, qi);
    res_str(r, what);
    res_vdev(r, m->v);
    return false;
}

static bool msix_fired(const struct msix_dev *m, u32 nm)
{
    u32 i, q;
    for (i = 0; i < nm; i++)
        for (q = m[i].qfirst; q <= m[i].qlast; q++)
            if (!irq_counts[m[i].v->irq_base + m[i].v->q[q].vector - IRQ_VECTOR_BASE])
                return false;
    return true;
}

static bool msix_run(struct msix_dev *m, u32 *nm_out, u32 *fired, u32 *spurious,
                     struct result *r)
{
    static const u32 types[MSIX_DEVS] = {VIRTIO_ID_RNG, VIRTIO_ID_BLK, VIRTIO_ID_CONSOLE};
    u32 t, i, q, nm = 0, vec = IRQ_VECTOR_BASE;
    u64 deadline;

    if (!msix_blk_buf) {
        msix_blk_buf = alloc_pages(VQ_MAX * 512 / 4096);
        if (!msix_blk_buf) {
            res_str(r, "out of memory");
            return false;
        }
    }
    for (i = 0; i < IRQ_VECTORS; i++)
        irq_counts[i] = 0;
    for (t = 0; t < MSIX_DEVS; t++) {
        struct msix_dev *d = &m[nm];
        int n = virtio_find(types[t], &d->v, 1, r);
        if (n < 0)
            return false;
        if (!n)
            continue;
        d->type = types[t];
        *nm_out = ++nm; /* from here on it needs a virtio_stop */
        if (d->type == VIRTIO_ID_BLK) {
            if (!blk_negotiate(d->v, &d->nq, r))
                return false;
        } else if (!virtio_init(d->v, 0, r)) {
            return false;
        } else {
            d->nq = d->type == VIRTIO_ID_RNG ? 1 : 2;
        }
        /* Console: only the transmitq completes without host input, and QEMU's
         * virtio-serial has 2 MSI-X entries: the receiveq gets no vector. */
        d->qfirst = d->type == VIRTIO_ID_CONSOLE ? 1 : 0;
        d->qlast = (u16)(d->nq - 1);
        if (vec + (d->nq - d->qfirst) + 1 > IRQ_VECTOR_BASE + IRQ_VECTORS) {
            res_str(r, "more than 32 vectors needed");
            return false;
        }
        if (!virtio_queues(d->v, d->nq, vec, d->qfirst, r))
            return false;
        vec += (d->nq - d->qfirst) + 1u;
    }
    if (!nm) {
        res_str(r, "no virtio-rng, virtio-blk or virtio-console device");
        return false;
    }

    /* A queue vector that fires with nothing in flight is a spurious interrupt
     * (legal, but wasted: a backend answering an idle kick, QEMU's
     * virtio-serial at DRIVER_OK): counted over a quiet spell, which also
     * keeps them out of the completions' count. The LAPIC timer (1 ms period
     * at a 1 GHz bus) bounds each hlt. */
    lapic_tick_start(1000000);
    deadline = rdtsc() + ms_to_tsc(MSIX_QUIET_MS);
    while (rdtsc() < deadline)
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    *spurious = 0;
    for (i = 0; i < nm; i++)
        for (q = m[i].qfirst; q <= m[i].qlast; q++)
            *spurious += irq_counts[m[i].v->irq_base + m[i].v->q[q].vector - IRQ_VECTOR_BASE];

    for (i = 0; i < IRQ_VECTORS; i++)
        irq_counts[i] = 0;
    for (i = 0; i < nm; i++)
        for (q = m[i].qfirst; q <= m[i].qlast; q++)
            if (!msix_submit(&m[i], (u16)q, r)) {
                lapic_tick_stop();
                return false;
            }

    /* hlt until every vector fired. */
    deadline = rdtsc() + ms_to_tsc(1000);
    for (;;) {
        cli();
        if (msix_fired(m, nm) || rdtsc() > deadline)
            break;
        __asm__ volatile("sti; hlt" ::: "memory"); /* sti's shadow covers hlt */
    }
    cli();
    lapic_tick_stop();

    *fired = 0;
    for (i = 0; i < nm; i++) {
        for (q = m[i].qfirst; q <= m[i].qlast; q++) {
            u32 v = m[i].v->irq_base + m[i].v->q[q].vector;
            if (!irq_counts[v - IRQ_VECTOR_BASE])
                return msix_vector_failed(&m[i], (u16)q, " did not fire within 1000 ms", r);
            (*fired)++;
            if (!msix_complete(&m[i], (u16)q, r))
                return false;
        }
    }
    return true;
}

bool step_msix(struct result *r)
{
    struct msix_dev m[MSIX_DEVS];
    u32 nm = 0, fired = 0, spurious = 0, i;
    bool ok;

    if (!lapic_usable(r))
        return false;
    for (i = 0; i < IRQ_VECTORS; i++)
        idt_install(IRQ_VECTOR_BASE + i, irq_stubs[i]);
    memset(m, 0, sizeof(m));
    ok = msix_run(m, &nm, &fired, &spurious, r);
    for (i = 0; i < nm; i++)
        virtio_stop(m[i].v);
    if (!ok)
        return false;
    res_kv_dec(r, "devices", nm);
    res_kv_dec(r, "vectors", fired);
    res_kv_dec(r, "spurious", spurious);
    return true;
}
