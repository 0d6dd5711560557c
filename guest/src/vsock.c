/*
 * virtio-vsock (virtio 1.2 §5.10): the vsock step, a polled stream driver
 * talking to the host through the VMM's vsock device.
 *  1. Server: accepts vsock_accept connections the host opens to guest port
 *     vsock_port, checks every byte against the pattern and echoes it back,
 *     until the host shuts each connection down.
 *  2. Client: opens vsock_connect connections to host port vsock_host_port
 *     (CID 2) at once, sends vsock_bytes of the pattern on each, checks the
 *     echo byte for byte, then shuts each one down and waits for the RST.
 * Byte j of every stream, each way, is vsock_pattern(j). Credit is kept both
 * ways: the guest never sends beyond what the host granted, and reports what
 * it consumed in every header.
 * For benchmarks, vsock_check=0 neither checks nor writes the pattern (the
 * bytes are whatever the buffers hold) and vsock_echo=0 makes the server a
 * sink and the client a source that does not wait for an echo. With
 * vsock_cpl3=1 an open connection's data is moved at CPL3 (user.c), which
 * runs natively where CPL0 is emulated: the connection set-up and close stay
 * here; the bytes are neither checked nor written (as vsock_check=0).
 */
#include "pci.h"

#define VSOCK_HDR 44
#define VSOCK_RX_BUFS 8
#define VSOCK_BUF 4096
#define VSOCK_CONNS_MAX 8
#define VSOCK_HOST_CID 2
#define VSOCK_BUF_ALLOC (1u << 20) /* the guest consumes at once: a large window */
#define VSOCK_LOCAL_BASE 0x10000   /* client ports: VSOCK_LOCAL_BASE + i */
#define VSOCK_TX_TIMEOUT_MS 2000

enum {
    OP_REQUEST = 1,
    OP_RESPONSE = 2,
    OP_RST = 3,
    OP_SHUTDOWN = 4,
    OP_RW = 5,
    OP_CREDIT_UPDATE = 6,
    OP_CREDIT_REQUEST = 7,
};
#define SHUTDOWN_BOTH 3

struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct vconn {
    bool used, open, shut, done;
    u32 local, peer;
    u64 rx, tx;   /* bytes received (checked), sent */
    u64 reported; /* rx as the host last heard it (fwd_cnt) */
    bool pumped;  /* its data went through the CPL3 pump */
    u32 peer_buf_alloc, peer_fwd_cnt;
};

static u8 *vs_rx_mem; /* VSOCK_RX_BUFS x VSOCK_BUF, allocated once */
static u8 vs_tx_pkt[VSOCK_HDR + VSOCK_BUF];
static struct vconn vconns[VSOCK_CONNS_MAX];
static u64 vs_cid;
static u64 vs_checked; /* bytes checked against the pattern, both phases */

static u8 vsock_pattern(u64 j) { return (u8)(j * 7 + (j >> 8)); }

#define VJ_TX_SLOTS 8
static struct vsock_job vj;
static u8 *vs_tx_slots; /* VJ_TX_SLOTS x 4096, allocated once */

static bool vs_fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    res_vdev(r, v);
    return false;
}

static void vs_rx_post(struct virtq *q, u16 id)
{
    vq_post_writable(q, id, (u64)(vs_rx_mem + (u64)id * VSOCK_BUF), VSOCK_BUF);
    vq_notify(q);
}

/* One packet on the tx queue, waited for. `payload` NULL: the pattern from c->tx. */
static bool vs_send(struct vdev *v, u32 local, u32 peer, u16 op, u32 flags, u32 fwd_cnt,
                    const u8 *payload, u32 len, struct vconn *c, struct result *r)
{
    struct vsock_hdr *h = (struct vsock_hdr *)vs_tx_pkt;
    struct vbuf b;
    u32 i, used;

    h->src_cid = vs_cid;
    h->dst_cid = VSOCK_HOST_CID;
    h->src_port = local;
    h->dst_port = peer;
    h->len = len;
    h->type = 1; /* STREAM */
    h->op = op;
    h->flags = flags;
    h->buf_alloc = VSOCK_BUF_ALLOC;
    h->fwd_cnt = fwd_cnt;
    if (payload)
        memcpy(vs_tx_pkt + VSOCK_HDR, payload, len);
    else if (cfg.vsock_check)
        for (i = 0; i < len; i++)
            vs_tx_pkt[VSOCK_HDR + i] = vsock_pattern(c->tx + i);
    b.addr = (u64)vs_tx_pkt;
    b.len = VSOCK_HDR + len;
    b.write = false;
    return vq_submit(v, &v->q[1], &b, 1, r) &&
           vq_wait(v, &v->q[1], &used, VSOCK_TX_TIMEOUT_MS, r);
}

static bool vs_reply(struct vdev *v, struct vconn *c, u16 op, u32 flags, struct result *r)
{
    return vs_send(v, c->local, c->peer, op, flags, (u32)c->rx, 0, 0, c, r);
}

static struct vconn *vs_find(u32 local, u32 peer)
{
    u32 i;
    for (i = 0; i < VSOCK_CONNS_MAX; i++)
        if (vconns[i].used && vconns[i].local == local && vconns[i].peer == peer)
            return &vconns[i];
    return NULL;
}

/* How many bytes the host lets this connection send now. */
static u32 vs_credit(const struct vconn *c)
{
    u32 in_flight = (u32)c->tx - c->peer_fwd_cnt;
    return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/* Checks received bytes against the pattern; in server mode echoes them. */
static bool vs_data(struct vdev *v, struct vconn *c, const u8 *p, u32 len, bool echo,
                    struct result *r)
{
    u32 i;
    for (i = 0; cfg.vsock_check && i < len; i++) {
        if (p[i] != vsock_pattern(c->rx + i)) {
            res_str(r, "byte ");
            res_dec(r, c->rx + i);
            res_str(r, " of port ");
            res_dec(r, c->local);
            res_str(r, " is ");
            res_hex(r, p[i]);
            res_str(r, " expected ");
            res_hex(r, vsock_pattern(c->rx + i));
            return vs_fail(r, v, "");
        }
    }
    c->rx += len;
    vs_checked += len;
    if (!echo) {
        /* A sink says what it consumed before the host's window runs out
         * (as Linux does): a host that never asks would stall. */
        if (c->rx - c->reported < VSOCK_BUF_ALLOC / 4)
            return true;
        c->reported = c->rx;
        return vs_reply(v, c, OP_CREDIT_UPDATE, 0, r);
    }
    if (vs_credit(c) < len)
        return vs_fail(r, v, "the host gave no credit for the echo");
    if (!vs_send(v, c->local, c->peer, OP_RW, 0, (u32)c->rx, p, len, c, r))
        return false;
    c->reported = c->rx;
    c->tx += len;
    return true;
}

/* One received packet. server: accept on vsock_port and echo; else client. */
static bool vs_handle(struct vdev *v, const struct vsock_hdr *h, const u8 *p, bool server,
                      struct result *r)
{
    struct vconn *c;
    u32 i;

    if (h->dst_cid != vs_cid || h->src_cid != VSOCK_HOST_CID || h->type != 1) {
        res_str(r, "packet for cid ");
        res_dec(r, h->dst_cid);
        res_str(r, " from cid ");
        res_dec(r, h->src_cid);
        res_str(r, " type ");
        res_dec(r, h->type);
        return vs_fail(r, v, "");
    }
    c = vs_find(h->dst_port, h->src_port);
    if (c) {
        c->peer_buf_alloc = h->buf_alloc;
        c->peer_fwd_cnt = h->fwd_cnt;
    }
    switch (h->op) {
    case OP_REQUEST:
        if (c || !server || h->dst_port != cfg.vsock_port)
            return vs_send(v, h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0, 0, r);
        for (i = 0; i < VSOCK_CONNS_MAX && vconns[i].used; i++)
            ;
        if (i == VSOCK_CONNS_MAX)
            return vs_send(v, h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0, 0, r);
        c = &vconns[i];
        memset(c, 0, sizeof(*c));
        c->used = c->open = true;
        c->local = h->dst_port;
        c->peer = h->src_port;
        c->peer_buf_alloc = h->buf_alloc;
        c->peer_fwd_cnt = h->fwd_cnt;
        return vs_reply(v, c, OP_RESPONSE, 0, r);
    case OP_RESPONSE:
        if (!c || server || c->open)
            return vs_fail(r, v, "unexpected RESPONSE");
        c->open = true;
        return true;
    case OP_RW:
        if (!c || !c->open)
            return vs_send(v, h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0, 0, r);
        return vs_data(v, c, p, h->len, server && cfg.vsock_echo, r);
    case OP_SHUTDOWN:
        if (!c)
            return true;
        /* The host is done: in server mode every byte must have come. */
        if (server && c->rx != cfg.vsock_bytes) {
            res_str(r, "host shut port ");
            res_dec(r, c->local);
            res_str(r, " down after ");
            res_dec(r, c->rx);
            res_str(r, " bytes");
            return vs_fail(r, v, "");
        }
        /* The host closed: the clean end is our RST (virtio 1.2 5.10.6.6). */
        c->done = true;
        return vs_reply(v, c, OP_RST, 0, r);
    case OP_RST:
        if (!c)
            return true;
        if (!c->open) {
            res_str(r, "host refused port ");
            res_dec(r, c->peer);
            return vs_fail(r, v, "");
        }
        if (!c->shut && !c->done) {
            res_str(r, "host reset port ");
            res_dec(r, c->local);
            res_str(r, " after ");
            res_dec(r, c->rx);
            res_str(r, " bytes");
            return vs_fail(r, v, "");
        }
        c->done = true;
        return true;
    case OP_CREDIT_REQUEST:
        return !c || vs_reply(v, c, OP_CREDIT_UPDATE, 0, r);
    case OP_CREDIT_UPDATE:
        return true;
    default:
        res_str(r, "unknown op ");
        res_dec(r, h->op);
        return vs_fail(r, v, "");
    }
}

/* Handles whatever the device put on the rx queue. */
static bool vs_poll(struct vdev *v, bool server, struct result *r)
{
    struct virtq *rxq = &v->q[0];
    u16 idx = rxq->used->idx;
    if ((u16)(idx - rxq->last_used) > rxq->size)
        return vs_fail(r, v, "rx used idx jumped");
    while (rxq->last_used != idx) {
        struct vsock_hdr h;
        u32 id, ulen;
        barrier();
        id = rxq->used->ring[rxq->last_used & (rxq->size - 1)].id;
        ulen = rxq->used->ring[rxq->last_used & (rxq->size - 1)].len;
        rxq->last_used++;
        if (id >= VSOCK_RX_BUFS || ulen > VSOCK_BUF || ulen < VSOCK_HDR)
            return vs_fail(r, v, "rx used element out of range");
        memcpy(&h, vs_rx_mem + (u64)id * VSOCK_BUF, VSOCK_HDR);
        if (h.len > ulen - VSOCK_HDR)
            return vs_fail(r, v, "rx packet longer than its buffer");
        if (!vs_handle(v, &h, vs_rx_mem + (u64)id * VSOCK_BUF + VSOCK_HDR, server, r))
            return false;
        vs_rx_post(rxq, (u16)id);
    }
    return true;
}

static void vj_ring(struct vsock_ring *o, const struct virtq *q)
{
    o->desc = q->desc;
    o->avail = q->avail;
    o->used = q->used;
    o->notify = q->notify;
    o->qindex = q->index;
    o->size = q->size;
    o->avail_idx = q->avail_idx;
    o->last_used = q->last_used;
}

/* Moves connection c's data at CPL3 (user_vsock); the rings go back to CPL0
 * as the pump left them. A packet it leaves (a SHUTDOWN, another
 * connection's) is handled here next. */
static bool vs_pump(struct vdev *v, struct vconn *c, u32 mode, struct result *r)
{
    struct virtq *rxq = &v->q[0], *txq = &v->q[1];
    u64 before = mode == VJ_SOURCE ? c->tx : c->rx;
    c->pumped = true;
    if (!vs_tx_slots) {
        vs_tx_slots = alloc_pages(VJ_TX_SLOTS);
        if (!vs_tx_slots)
            return vs_fail(r, v, "out of memory");
    }
    if (!map_mmio(rxq->notify, 2, true) || !map_mmio(txq->notify, 2, true) ||
        !user_mapped(rxq->notify, 2) || !user_mapped(txq->notify, 2) ||
        !user_mapped((u64)rxq->mem, 3 * 4096) || !user_mapped((u64)txq->mem, 3 * 4096))
        return vs_fail(r, v, "cannot map the notify registers or rings for CPL3");
    memset(&vj, 0, sizeof(vj));
    vj_ring(&vj.rx, rxq);
    vj_ring(&vj.tx, txq);
    vj.rx_mem = (u64)vs_rx_mem;
    vj.nrx = VSOCK_RX_BUFS;
    vj.tx_mem = (u64)vs_tx_slots;
    vj.ntx = txq->size < VJ_TX_SLOTS ? txq->size : VJ_TX_SLOTS;
    vj.mode = mode;
    vj.cid = vs_cid;
    vj.local = c->local;
    vj.peer = c->peer;
    vj.buf_alloc = VSOCK_BUF_ALLOC;
    vj.bytes = cfg.vsock_bytes;
    vj.timeout = ms_to_tsc(VSOCK_TX_TIMEOUT_MS);
    vj.got = c->rx;
    vj.sent = c->tx;
    vj.reported = c->reported;
    vj.peer_buf_alloc = c->peer_buf_alloc;
    vj.peer_fwd_cnt = c->peer_fwd_cnt;
    run_user(user_vsock, &vj);
    rxq->avail_idx = vj.rx.avail_idx;
    rxq->last_used = vj.rx.last_used;
    txq->avail_idx = vj.tx.avail_idx;
    txq->last_used = vj.tx.last_used;
    txq->busy = false;
    c->rx = vj.got;
    c->tx = vj.sent;
    c->reported = vj.reported;
    c->peer_buf_alloc = vj.peer_buf_alloc;
    c->peer_fwd_cnt = vj.peer_fwd_cnt;
    vs_checked += (mode == VJ_SOURCE ? c->tx : c->rx) - before;
    if (vj.err == VJ_OK || vj.err == VJ_STOPPED)
        return true;
    res_str(r, vj.err == VJ_TIMEOUT ? "CPL3 vsock pump timed out" : "CPL3 vsock pump: bad used ring");
    res_str(r, " rx=");
    res_dec(r, c->rx);
    res_str(r, " tx=");
    res_dec(r, c->tx);
    return vs_fail(r, v, "");
}

/* Server: the open connections whose data the CPL3 pump has not moved yet. */
static bool vs_pump_accepted(struct vdev *v, struct result *r)
{
    u32 i;
    for (i = 0; cfg.vsock_cpl3 && i < VSOCK_CONNS_MAX; i++) {
        struct vconn *c = &vconns[i];
        if (c->used && c->open && !c->done && !c->pumped &&
            !vs_pump(v, c, cfg.vsock_echo ? VJ_ECHO : VJ_SINK, r))
            return false;
    }
    return true;
}

static u32 vs_count(bool done)
{
    u32 i, n = 0;
    for (i = 0; i < VSOCK_CONNS_MAX; i++)
        if (vconns[i].used && (!done || vconns[i].done))
            n++;
    return n;
}

static bool vs_timeout(struct vdev *v, const char *phase, struct result *r)
{
    res_str(r, "timeout in ");
    res_str(r, phase);
    res_str(r, " after ");
    res_dec(r, cfg.vsock_timeout_ms);
    res_str(r, " ms done=");
    res_dec(r, vs_count(true));
    return vs_fail(r, v, "");
}

static bool vs_server(struct vdev *v, struct result *r)
{
    u64 deadline = rdtsc() + ms_to_tsc(cfg.vsock_timeout_ms);
    struct line l;
    line_begin(&l);
    line_str(&l, "vsock listening port=");
    line_dec(&l, cfg.vsock_port);
    line_str(&l, " cid=");
    line_dec(&l, vs_cid);
    line_end(&l);
    while (vs_count(true) < cfg.vsock_accept) {
        if (!vs_poll(v, true, r) || !vs_pump_accepted(v, r))
            return false;
        if (rdtsc() > deadline)
            return vs_timeout(v, "accept", r);
        cpu_relax();
    }
    return true;
}

static bool vs_client(struct vdev *v, struct result *r)
{
    u64 deadline = rdtsc() + ms_to_tsc(cfg.vsock_timeout_ms);
    struct line l;
    u32 i;
    line_begin(&l);
    line_str(&l, "vsock connecting port=");
    line_dec(&l, cfg.vsock_host_port);
    line_end(&l);
    for (i = 0; i < cfg.vsock_connect; i++) {
        struct vconn *c = &vconns[i];
        memset(c, 0, sizeof(*c));
        c->used = true;
        c->local = VSOCK_LOCAL_BASE + i;
        c->peer = (u32)cfg.vsock_host_port;
        if (!vs_reply(v, c, OP_REQUEST, 0, r))
            return false;
    }
    while (vs_count(true) < cfg.vsock_connect) {
        if (!vs_poll(v, false, r))
            return false;
        for (i = 0; i < cfg.vsock_connect; i++) {
            struct vconn *c = &vconns[i];
            u32 len = VSOCK_BUF - VSOCK_HDR, credit;
            if (!c->open || c->shut)
                continue;
            if (cfg.vsock_cpl3 && !c->pumped && !cfg.vsock_echo) {
                if (!vs_pump(v, c, VJ_SOURCE, r))
                    return false;
                continue;
            }
            if (c->tx < cfg.vsock_bytes) {
                credit = vs_credit(c);
                if (len > cfg.vsock_bytes - c->tx)
                    len = (u32)(cfg.vsock_bytes - c->tx);
                if (len > credit)
                    len = credit;
                if (len) {
                    if (!vs_send(v, c->local, c->peer, OP_RW, 0, (u32)c->rx, 0, len, c, r))
                        return false;
                    c->tx += len;
                }
            } else if (c->rx == cfg.vsock_bytes || !cfg.vsock_echo) {
                /* Every byte came back: close, and wait for the host's RST. */
                c->shut = true;
                if (!vs_reply(v, c, OP_SHUTDOWN, SHUTDOWN_BOTH, r))
                    return false;
            }
        }
        if (rdtsc() > deadline)
            return vs_timeout(v, "connect", r);
        cpu_relax();
    }
    return true;
}

bool step_vsock(struct result *r)
{
    struct vdev *v;
    int n;
    u16 i;
    bool ok;

    if (cfg.vsock_bad || cfg.vsock_accept > VSOCK_CONNS_MAX ||
        cfg.vsock_connect > VSOCK_CONNS_MAX || cfg.vsock_bytes > (1u << 30) ||
        cfg.vsock_port > 0xffffffffULL || cfg.vsock_host_port > 0xffffffffULL) {
        res_str(r, "bad vsock_* value");
        return false;
    }
    n = virtio_find(VIRTIO_ID_VSOCK, &v, 1, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-vsock device");
        return false;
    }
    if (!vs_rx_mem) {
        vs_rx_mem = alloc_pages(VSOCK_RX_BUFS * VSOCK_BUF / 4096);
        if (!vs_rx_mem) {
            res_str(r, "out of memory");
            return false;
        }
    }
    memset(vconns, 0, sizeof(vconns));
    vs_checked = 0;
    ok = virtio_init(v, 0, r);
    if (ok && (!v->devcfg || v->devcfg_len < 8))
        ok = vs_fail(r, v, "no usable virtio-vsock device config");
    if (ok) {
        vs_cid = (u64)virtio_cfg32(v, 0) | (u64)virtio_cfg32(v, 4) << 32;
        ok = virtio_queues(v, 3, 0, 0, r);
    }
    if (ok) {
        for (i = 0; i < VSOCK_RX_BUFS && i < v->q[0].size; i++)
            vs_rx_post(&v->q[0], i);
        if (cfg.vsock_accept)
            ok = vs_server(v, r);
        memset(vconns, 0, sizeof(vconns));
        if (ok && cfg.vsock_connect)
            ok = vs_client(v, r);
    }
    if (ok)
        ok = virtio_check_status(v, r);
    virtio_stop(v);
    if (!ok)
        return false;
    res_kv_dec(r, "cid", vs_cid);
    res_kv_dec(r, "accepted", cfg.vsock_accept);
    res_kv_dec(r, "connected", cfg.vsock_connect);
    res_kv_dec(r, "bytes", vs_checked);
    return true;
}
