/*
 * virtio-net: the net step. One broadcast frame out on transmitq 0, then
 * frames in on receiveq 0 until one with ethertype 0x88b5 whose payload
 * starts with "vmkit-host" arrives (the host side of the test answers).
 * Polled, CPL0; the byte work is a few dozen bytes per frame.
 */
#include "pci.h"

#define VIRTIO_NET_F_MAC (1ULL << 5)

#define NET_HDR_LEN 12  /* struct virtio_net_hdr with num_buffers (VERSION_1) */
#define ETH_HLEN 14
#define NET_FRAME_LEN 60 /* minimum Ethernet frame without FCS */
#define NET_ETHERTYPE 0x88b5 /* IEEE local experimental */
#define NET_RX_BUFS 8
#define NET_BUF 2048 /* per receive buffer: header + 1514 bytes fit */
#define NET_TX_TIMEOUT_MS 2000
#define NET_PAYLOAD_SHOWN 40

static const char net_ping[] = "vmkit-guest net ping";
static const char net_pong[] = "vmkit-host";

static u8 *net_rx_mem; /* NET_RX_BUFS x NET_BUF, allocated once */
static u8 net_tx_pkt[NET_HDR_LEN + NET_FRAME_LEN];

static bool net_fail(struct result *r, const struct vdev *v, const char *msg)
{
    res_str(r, msg);
    res_vdev(r, v);
    return false;
}

/* Makes receive buffer `id` available. */
static void rx_post(struct virtq *q, u16 id)
{
    vq_post_writable(q, id, (u64)(net_rx_mem + (u64)id * NET_BUF), NET_BUF);
}

static bool is_pong(const u8 *frame, u32 len)
{
    u32 i;
    if (len < ETH_HLEN + sizeof(net_pong) - 1)
        return false;
    if (frame[12] != (NET_ETHERTYPE >> 8) || frame[13] != (NET_ETHERTYPE & 0xff))
        return false;
    for (i = 0; i < sizeof(net_pong) - 1; i++)
        if (frame[ETH_HLEN + i] != (u8)net_pong[i])
            return false;
    return true;
}

static void print_rx(const u8 *frame, u32 len)
{
    struct line l;
    u32 i;
    line_begin(&l);
    line_str(&l, "net rx len=");
    line_dec(&l, len);
    line_str(&l, " payload=");
    for (i = ETH_HLEN; i < len && i < ETH_HLEN + NET_PAYLOAD_SHOWN && frame[i]; i++)
        line_char(&l, frame[i] >= 0x20 && frame[i] < 0x7f ? (char)frame[i] : '?');
    line_end(&l);
}

static void res_mac(struct result *r, const u8 *mac)
{
    static const char hex[] = "0123456789abcdef";
    char text[18];
    u32 i;
    for (i = 0; i < 6; i++) {
        text[3 * i] = hex[mac[i] >> 4];
        text[3 * i + 1] = hex[mac[i] & 15];
        text[3 * i + 2] = i < 5 ? ':' : 0;
    }
    res_str(r, " mac=");
    res_strn(r, text, 17);
}

/* The MAC from the config space, read until the generation is stable. */
static bool net_mac(struct vdev *v, u8 *mac, struct result *r)
{
    u32 tries, i;
    if (!v->devcfg || v->devcfg_len < 6)
        return net_fail(r, v, "no usable virtio-net device config");
    for (tries = 0;; tries++) {
        u8 gen = virtio_cfg_gen(v);
        for (i = 0; i < 6; i++)
            mac[i] = virtio_cfg8(v, i);
        if (virtio_cfg_gen(v) == gen)
            return true;
        if (tries == 10)
            return net_fail(r, v, "config generation keeps changing");
    }
}

static bool net_run(struct vdev *v, struct result *r)
{
    struct virtq *rxq, *txq;
    struct vbuf b;
    u8 mac[6], *frame;
    u32 i, nrx, len, rx_frames = 0;
    u64 deadline;

    if (!net_rx_mem) {
        net_rx_mem = alloc_pages(NET_RX_BUFS * NET_BUF / 4096);
        if (!net_rx_mem) {
            res_str(r, "out of memory");
            return false;
        }
    }
    if (!virtio_init(v, VIRTIO_NET_F_MAC, r))
        return false;
    if (!(v->features & VIRTIO_NET_F_MAC))
        return net_fail(r, v, "device does not offer VIRTIO_NET_F_MAC");
    if (!net_mac(v, mac, r) || !virtio_queues(v, 2, 0, 0, r))
        return false;
    rxq = &v->q[0];
    txq = &v->q[1];
    txq->lax_len = cfg.net_lax_len != 0;

    /* Receive buffers first, so the answer cannot come before them. */
    nrx = rxq->size < NET_RX_BUFS ? rxq->size : NET_RX_BUFS;
    for (i = 0; i < nrx; i++)
        rx_post(rxq, (u16)i);
    vq_notify(rxq);

    memset(net_tx_pkt, 0, sizeof(net_tx_pkt));
    frame = net_tx_pkt + NET_HDR_LEN;
    for (i = 0; i < 6; i++) {
        frame[i] = 0xff;
        frame[6 + i] = mac[i];
    }
    frame[12] = NET_ETHERTYPE >> 8;
    frame[13] = NET_ETHERTYPE & 0xff;
    memcpy(frame + ETH_HLEN, net_ping, sizeof(net_ping) - 1);
    b.addr = (u64)net_tx_pkt;
    b.len = sizeof(net_tx_pkt);
    b.write = false;
    if (!vq_submit(v, txq, &b, 1, r) || !vq_wait(v, txq, &len, NET_TX_TIMEOUT_MS, r))
        return false;

    deadline = rdtsc() + ms_to_tsc(cfg.net_timeout_ms);
    for (;;) {
        u16 idx = rxq->used->idx;
        if ((u16)(idx - rxq->last_used) > rxq->size) {
            res_str(r, "used idx jumped from ");
            res_dec(r, rxq->last_used);
            res_str(r, " to ");
            res_dec(r, idx);
            return net_fail(r, v, " on the receiveq");
        }
        while (rxq->last_used != idx) {
            u32 id, ulen;
            barrier(); /* the element after the index (x86 keeps loads in order) */
            id = rxq->used->ring[rxq->last_used & (rxq->size - 1)].id;
            ulen = rxq->used->ring[rxq->last_used & (rxq->size - 1)].len;
            rxq->last_used++;
            if (id >= nrx || ulen > NET_BUF) {
                res_str(r, id >= nrx ? "used id " : "used len ");
                res_dec(r, id >= nrx ? id : ulen);
                return net_fail(r, v, " out of range on the receiveq");
            }
            rx_frames++;
            frame = net_rx_mem + (u64)id * NET_BUF + NET_HDR_LEN;
            if (ulen >= NET_HDR_LEN && is_pong(frame, ulen - NET_HDR_LEN)) {
                print_rx(frame, ulen - NET_HDR_LEN);
                res_mac(r, mac);
                res_kv_dec(r, "tx", 1);
                res_kv_dec(r, "rx", rx_frames);
                return virtio_check_status(v, r);
            }
            rx_post(rxq, (u16)id); /* not the answer: recycle the buffer */
            vq_notify(rxq);
        }
        if (rdtsc() > deadline)
            break;
        cpu_relax();
    }
    if (!virtio_check_status(v, r))
        return false;
    res_str(r, "timeout waiting for a frame after ");
    res_dec(r, cfg.net_timeout_ms);
    res_str(r, " ms rx=");
    res_dec(r, rx_frames);
    res_vdev(r, v);
    return false;
}

bool step_net(struct result *r)
{
    struct vdev *v;
    int n;
    bool ok;

    if (cfg.net_bad) {
        res_str(r, "bad net_timeout_ms value");
        return false;
    }
    n = virtio_find(VIRTIO_ID_NET, &v, 1, r);
    if (n < 0)
        return false;
    if (!n) {
        res_str(r, "no virtio-net device");
        return false;
    }
    ok = net_run(v, r);
    virtio_stop(v);
    return ok;
}
