/*
 * trustmig test guest: a freestanding 32-bit multiboot kernel for `qemu-system-x86_64 -kernel`.
 *
 * It fills a data area with self-describing pages, then forever: dirties `rate` pages per tick
 * (a tick is 2^tsc_shift TSC cycles), prints a tick line with a monotonic counter, and every
 * `check` ticks verifies every page of the data area and prints the result:
 *
 *   T <counter> <generation>
 *   V <counter> bad=<pages that fail their own check> sum=<xor of all page stamps>
 *
 * A page is consistent when word 1 is its index and every other word derives from word 0 (its
 * stamp): a stale page (a lost write, see the QEMU 7.2 TCG note in the issue) still checks,
 * an altered byte does not. Parameters come from the multiboot command line (`-append`):
 *   area=<MiB> (default 16)  rate=<pages per tick> (default 0: idle)
 *   check=<ticks> (default 20)  tsc_shift=<n> (default 25)
 * Build: gcc -m32 -ffreestanding -fno-pic -fno-stack-protector -nostdlib -O2 -c guest.c
 *        ld -m elf_i386 -T guest.ld -o guest.elf guest.o
 */
typedef unsigned int u32;
typedef unsigned long long u64;

#define DATA_BASE 0x400000u /* 4 MiB: above the kernel and its stack */
#define PAGE_WORDS 1024u

__attribute__((section(".multiboot"), aligned(4), used))
static const u32 multiboot_header[3] = {0x1BADB002u, 0u, (u32)(0u - 0x1BADB002u)};

unsigned char guest_stack[65536] __attribute__((aligned(16), used));

/* Globals, not stack: the counter must survive a stale stack page. */
static volatile u32 counter;
static volatile u32 generation;
static volatile u32 next_page;

void kmain(u32 magic, u32 info);

__asm__(".text\n.globl start\nstart:\n"
        "  mov $guest_stack+65536, %esp\n"
        "  push %ebx\n  push %eax\n"
        "  call kmain\n"
        "1: hlt\n  jmp 1b\n");

static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline unsigned char inb(unsigned short port) {
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static void putc(char c) {
    while (!(inb(0x3f8 + 5) & 0x20)) {
    }
    outb(0x3f8, (unsigned char)c);
}
static void puts(const char *s) {
    while (*s)
        putc(*s++);
}
static void putu(u32 v) {
    char b[12];
    int i = 0;
    do {
        b[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        putc(b[--i]);
}
static void puthex(u32 v) {
    for (int i = 7; i >= 0; i--)
        putc("0123456789abcdef"[(v >> (i * 4)) & 15]);
}

static u32 word(u32 stamp, u32 page, u32 j) {
    u32 x = stamp ^ (j * 2654435761u) ^ (page << 7);
    x ^= x >> 15;
    x *= 0x2c1b3c6du;
    return x ^ (x >> 12);
}

static void write_page(u32 page, u32 stamp) {
    volatile u32 *p = (volatile u32 *)(DATA_BASE + page * 4096u);
    p[0] = stamp;
    p[1] = page;
    for (u32 j = 2; j < PAGE_WORDS; j++)
        p[j] = word(stamp, page, j);
}

static int page_ok(u32 page, u32 *stamp) {
    volatile u32 *p = (volatile u32 *)(DATA_BASE + page * 4096u);
    u32 s = p[0];
    *stamp = s;
    if (p[1] != page)
        return 0;
    for (u32 j = 2; j < PAGE_WORDS; j++)
        if (p[j] != word(s, page, j))
            return 0;
    return 1;
}

/* Parse `key=<decimal>` from the command line. */
static u32 param(const char *cmd, const char *key, u32 def) {
    if (!cmd)
        return def;
    for (const char *c = cmd; *c; c++) {
        if (c != cmd && c[-1] != ' ')
            continue;
        const char *k = key, *q = c;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (*k || *q != '=')
            continue;
        q++;
        u32 v = 0;
        int any = 0;
        while (*q >= '0' && *q <= '9') {
            v = v * 10 + (u32)(*q++ - '0');
            any = 1;
        }
        return any ? v : def;
    }
    return def;
}

void kmain(u32 magic, u32 info) {
    const char *cmd = 0;
    if (magic == 0x2BADB002u && (((volatile u32 *)info)[0] & 4u))
        cmd = (const char *)((volatile u32 *)info)[4];
    u32 pages = param(cmd, "area", 16) * 256u;
    u32 rate = param(cmd, "rate", 0);
    u32 check = param(cmd, "check", 20);
    u32 shift = param(cmd, "tsc_shift", 25);
    if (check == 0)
        check = 1;
    if (shift > 40)
        shift = 40;
    puts("trustmig guest: pages=");
    putu(pages);
    puts(" rate=");
    putu(rate);
    puts("\n");
    for (u32 p = 0; p < pages; p++)
        write_page(p, 1);
    generation = 1;
    puts("READY\n");
    u64 period = (u64)1 << shift;
    u64 next = rdtsc() + period;
    for (;;) {
        /* Dirty `rate` pages, then wait out the tick. */
        for (u32 i = 0; i < rate && pages; i++) {
            u32 p = next_page;
            write_page(p, generation * 2654435761u + p);
            p++;
            if (p >= pages) {
                p = 0;
                generation++;
            }
            next_page = p;
        }
        while ((long long)(rdtsc() - next) < 0)
            __asm__ volatile("pause");
        next += period;
        u64 now = rdtsc();
        if ((long long)(now - next) > (long long)(period * 4))
            next = now + period; /* after a long stop (migration), do not race to catch up */
        counter++;
        puts("T ");
        putu(counter);
        puts(" ");
        putu(generation);
        puts("\n");
        if (counter % check == 0) {
            u32 bad = 0, sum = 0, s;
            for (u32 p = 0; p < pages; p++) {
                if (!page_ok(p, &s))
                    bad++;
                sum ^= s;
            }
            puts("V ");
            putu(counter);
            puts(" bad=");
            putu(bad);
            puts(" sum=");
            puthex(sum);
            puts("\n");
        }
    }
}
