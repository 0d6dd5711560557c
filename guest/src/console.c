/*
 * Serial console: a 16550 UART at I/O port 0x3f8, polled, no interrupts.
 *
 * Every port access is a VM exit (~10 us on kvm_pvm), so LSR is polled once
 * per FIFO load: with the 16550's 16-byte FIFO enabled, THRE set means the
 * FIFO is empty and 16 bytes may follow. Without a FIFO (IIR bits 7:6 not
 * 11 after enabling it), LSR is polled before every byte.
 *
 * Lines are built in a buffer under a spinlock (lock cmpxchg) so that APs
 * and the BSP never interleave within a line.
 */
#include "guest.h"

#define COM1 0x3f8
#define UART_THR (COM1 + 0)
#define UART_IER (COM1 + 1)
#define UART_FCR (COM1 + 2)
#define UART_IIR (COM1 + 2)
#define UART_LCR (COM1 + 3)
#define UART_LSR (COM1 + 5)
#define LSR_THRE 0x20
#define LSR_POLL_MAX 100000 /* ~1 s of exits; after one timeout, stop polling */

static u32 uart_burst;
static bool uart_nopoll;
static volatile u32 console_lock;

void serial_init(void)
{
    outb(UART_IER, 0x00); /* no UART interrupts */
    outb(UART_LCR, 0x03); /* 8N1, DLAB off; VMMs ignore the baud rate */
    outb(UART_FCR, 0x07); /* enable and clear both FIFOs */
    uart_burst = (inb(UART_IIR) & 0xc0) == 0xc0 ? 16 : 1;
}

static void uart_write(const char *s, size_t n)
{
    while (n) {
        size_t k;
        if (!uart_nopoll) {
            u32 spins = 0;
            while (!(inb(UART_LSR) & LSR_THRE)) {
                if (++spins == LSR_POLL_MAX) {
                    uart_nopoll = true;
                    break;
                }
            }
        }
        k = n < uart_burst ? n : uart_burst;
        if (k == 0)
            k = 1; /* before serial_init */
        n -= k;
        /* One instruction for the burst; KVM still exits once per byte. */
        __asm__ volatile("rep outsb" : "+S"(s), "+c"(k) : "d"(UART_THR) : "memory");
    }
}

static void lock(void)
{
    for (;;) {
        u32 expected = 0;
        if (__atomic_compare_exchange_n(&console_lock, &expected, 1, false, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED))
            return;
        while (console_lock)
            cpu_relax();
    }
}

static void unlock(void) { __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE); }

void console_break_lock(void) { unlock(); }

static void line_flush(struct line *l)
{
    uart_write(l->buf, l->n);
    l->n = 0;
}

void line_begin(struct line *l)
{
    lock();
    l->n = 0;
    line_str(l, "vmkit-guest: ");
}

void line_char(struct line *l, char c)
{
    if (l->n == sizeof(l->buf))
        line_flush(l);
    l->buf[l->n++] = c;
}

void line_strn(struct line *l, const char *s, size_t n)
{
    while (n) {
        size_t k = sizeof(l->buf) - l->n;
        if (!k) {
            line_flush(l);
            k = sizeof(l->buf);
        }
        if (k > n)
            k = n;
        memcpy(l->buf + l->n, s, k);
        l->n += k;
        s += k;
        n -= k;
    }
}

void line_str(struct line *l, const char *s) { line_strn(l, s, strlen(s)); }

/* Digits of v in base 10 or 16 into tmp (reversed); returns the count. */
static size_t digits(u64 v, unsigned base, char *tmp)
{
    size_t n = 0;
    do {
        unsigned d = (unsigned)(v % base);
        tmp[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    return n;
}

void line_dec(struct line *l, u64 v)
{
    char tmp[24];
    size_t n = digits(v, 10, tmp);
    while (n)
        line_char(l, tmp[--n]);
}

void line_hex(struct line *l, u64 v)
{
    char tmp[24];
    size_t n = digits(v, 16, tmp);
    line_str(l, "0x");
    while (n)
        line_char(l, tmp[--n]);
}

void line_hexpad(struct line *l, u64 v, u32 width)
{
    while (width--) {
        u32 d = (u32)(v >> (width * 4)) & 15;
        line_char(l, (char)(d < 10 ? '0' + d : 'a' + d - 10));
    }
}

void line_end(struct line *l)
{
    line_char(l, '\n');
    line_flush(l);
    unlock();
}

void say(const char *s)
{
    struct line l;
    line_begin(&l);
    line_str(&l, s);
    line_end(&l);
}

/* ---- step results (truncated silently when full) ---- */

static void res_char(struct result *r, char c)
{
    if (r->n < sizeof(r->buf))
        r->buf[r->n++] = c;
}

void res_strn(struct result *r, const char *s, size_t n)
{
    while (n--)
        res_char(r, *s++);
}

void res_str(struct result *r, const char *s)
{
    while (*s)
        res_char(r, *s++);
}

void res_dec(struct result *r, u64 v)
{
    char tmp[24];
    size_t n = digits(v, 10, tmp);
    while (n)
        res_char(r, tmp[--n]);
}

void res_hex(struct result *r, u64 v)
{
    char tmp[24];
    size_t n = digits(v, 16, tmp);
    res_str(r, "0x");
    while (n)
        res_char(r, tmp[--n]);
}

void res_kv_dec(struct result *r, const char *key, u64 v)
{
    res_char(r, ' ');
    res_str(r, key);
    res_char(r, '=');
    res_dec(r, v);
}

void res_kv_hex(struct result *r, const char *key, u64 v)
{
    res_char(r, ' ');
    res_str(r, key);
    res_char(r, '=');
    res_hex(r, v);
}
