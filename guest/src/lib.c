/*
 * The few libc pieces the guest needs. gcc may emit calls to memset and
 * memcpy for struct copies, so they must exist; rep movsb/stosb keep them
 * to one (emulated) instruction each.
 */
#include "guest.h"

void *memset(void *d, int c, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return ret;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

bool str_eq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

bool word_eq(const char *a, size_t n, const char *b)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (b[i] != a[i] || b[i] == 0)
            return false;
    return b[n] == 0;
}

/* Decimal, or hexadecimal with a 0x prefix. */
bool parse_u64(const char *s, size_t n, u64 *out)
{
    u64 v = 0;
    size_t i = 0;
    unsigned base = 10;

    if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        i = 2;
    }
    if (i >= n)
        return false;
    for (; i < n; i++) {
        char c = s[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (unsigned)(c - 'A' + 10);
        else
            return false;
        if (v > (~0ULL - d) / base)
            return false; /* overflow */
        v = v * base + d;
    }
    *out = v;
    return true;
}
