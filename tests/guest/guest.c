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
 *   spin=1: wait for the next tick by spinning on the TSC (default: halt, woken by the PIT at
 *   1 kHz, so an idle guest leaves the host's cores to the migration, as a real idle guest does)
 *   tpm=1: with a TPM TIS at 0xFED40000 (QEMU tpm-tis), at every check also extend SHA-256 PCR 16
 *   with 32 bytes of 0xA5 and print `P <extends so far> <PCR 16, 64 hex digits>` (or
 *   `P <n> error <rc>`), so a test can follow the hash chain across a migration.
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

/* Globals, not stack, and on a page of their own: the counter must survive a stale stack page
 * (the QEMU 7.2 TCG defect), and the linker would otherwise put them on the stack's top page.
 * Each tick also drops the page's TLB entry before writing it (see the tick loop). */
static volatile struct {
    u32 counter, generation, next_page;
    u32 rest_of_the_page[1021];
} state __attribute__((aligned(4096)));
#define counter state.counter
#define generation state.generation
#define next_page state.next_page

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

/* Waiting for a tick: halt until the next interrupt. Under TCG a vCPU spinning on the TSC takes a
 * whole host core, which the migration (QEMU's own and the agents') then lacks. The legacy PIT
 * wakes the vCPU every millisecond; its handler only acknowledges the interrupt. */
struct idt_gate {
    unsigned short off_lo, sel;
    unsigned char zero, type;
    unsigned short off_hi;
} __attribute__((packed));
static struct idt_gate idt[48] __attribute__((aligned(8)));
void irq_stub(void);
__asm__(".text\n.globl irq_stub\nirq_stub:\n"
        "  push %eax\n  mov $0x20, %al\n  out %al, $0x20\n  pop %eax\n"
        "  iret\n");

static void timer_init(void) {
    unsigned short cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    u32 h = (u32)irq_stub;
    for (int v = 32; v < 48; v++)
        idt[v] = (struct idt_gate){(unsigned short)h, cs, 0, 0x8E, (unsigned short)(h >> 16)};
    struct {
        unsigned short limit;
        u32 base;
    } __attribute__((packed)) idtr = {sizeof idt - 1, (u32)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* PIC: IRQs 0-15 at vectors 32-47, all masked but IRQ 0 (the PIT). */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 32);
    outb(0xA1, 40);
    outb(0x21, 4);
    outb(0xA1, 2);
    outb(0x21, 1);
    outb(0xA1, 1);
    outb(0x21, 0xFE);
    outb(0xA1, 0xFF);
    /* PIT channel 0 as a rate generator: 1193182 Hz / 1193 = 1 kHz. */
    outb(0x43, 0x34);
    outb(0x40, 1193 & 0xFF);
    outb(0x40, 1193 >> 8);
}

/* Halt until the next timer interrupt. Interrupts are enabled only inside `hlt` (an interrupt
 * cannot come between `sti` and `hlt`), so the interrupt frame always lands here; dropping the
 * TLB entries of the stack first lets QEMU 7.2's TCG see that write (see `state` above): a
 * guest stopped inside the handler would otherwise resume with a stale frame. */
static inline void wait_for_interrupt(void) {
    __asm__ volatile("invlpg (%%esp)\n  invlpg -16(%%esp)\n  sti\n  hlt\n  cli" : : : "memory");
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

/* TPM 2.0 through the TIS MMIO registers of locality 0 (TCG PC Client TIS). */
#define TIS(off) ((volatile unsigned char *)(0xFED40000u + (off)))
#define TIS_ACCESS 0x00
#define TIS_STS 0x18
#define TIS_FIFO 0x24

static volatile u32 pcr_extends;
static unsigned char tpm_buf[128];

static int tis_wait(u32 off, unsigned char mask) {
    for (u32 i = 0; i < 100000000u; i++)
        if ((*TIS(off) & mask) == mask)
            return 1;
    return 0;
}

static u32 be32(const unsigned char *p) {
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

/* Send `len` bytes of tpm_buf, read the response into tpm_buf; returns the response code,
 * or 0xFFFFFFFF when the TIS does not answer. */
static u32 tpm_cmd(u32 len) {
    *TIS(TIS_ACCESS) = 0x02; /* requestUse */
    if (!tis_wait(TIS_ACCESS, 0xA0)) /* tpmRegValidSts | activeLocality */
        return 0xFFFFFFFFu;
    *TIS(TIS_STS) = 0x40; /* commandReady */
    if (!tis_wait(TIS_STS, 0x40))
        return 0xFFFFFFFFu;
    for (u32 i = 0; i < len; i++)
        *TIS(TIS_FIFO) = tpm_buf[i];
    *TIS(TIS_STS) = 0x20; /* tpmGo */
    if (!tis_wait(TIS_STS, 0x90)) /* stsValid | dataAvail */
        return 0xFFFFFFFFu;
    for (u32 i = 0; i < 10; i++)
        tpm_buf[i] = *TIS(TIS_FIFO);
    u32 size = be32(tpm_buf + 2);
    for (u32 i = 10; i < size && i < sizeof tpm_buf; i++)
        tpm_buf[i] = *TIS(TIS_FIFO);
    *TIS(TIS_STS) = 0x40; /* back to ready */
    return be32(tpm_buf + 6);
}

static u32 put(u32 at, const unsigned char *b, u32 n) {
    for (u32 i = 0; i < n; i++)
        tpm_buf[at + i] = b[i];
    return at + n;
}

static void tpm_startup(void) {
    static const unsigned char startup[12] = {0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0};
    put(0, startup, 12);
    tpm_cmd(12); /* TPM_RC_INITIALIZE if the firmware already started it: fine */
}

/* PCR_Extend(16, sha256: 0xA5 * 32), then PCR_Read(sha256, 16); print the result. */
static void tpm_extend_and_print(void) {
    static const unsigned char extend[33] = {
        0x80, 0x02, 0, 0, 0, 65, 0, 0, 0x01, 0x82, /* sessions, size 65, PCR_Extend */
        0, 0, 0, 16,                               /* PCR 16 */
        0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0,  /* password session, empty auth */
        0, 0, 0, 1, 0, 0x0B};                      /* one digest, SHA-256 */
    u32 n = put(0, extend, 33);
    for (u32 i = 0; i < 32; i++)
        tpm_buf[n++] = 0xA5;
    u32 rc = tpm_cmd(n);
    if (rc == 0)
        pcr_extends++;
    static const unsigned char read[20] = {0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7E,
                                           0, 0, 0, 1, 0, 0x0B, 3, 0, 0, 1};
    put(0, read, 20);
    if (rc == 0)
        rc = tpm_cmd(20);
    puts("P ");
    putu(pcr_extends);
    if (rc != 0) {
        puts(" error ");
        puthex(rc);
    } else {
        puts(" ");
        for (u32 i = 30; i < 62; i++) {
            putc("0123456789abcdef"[tpm_buf[i] >> 4]);
            putc("0123456789abcdef"[tpm_buf[i] & 15]);
        }
    }
    puts("\n");
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
    u32 tpm = param(cmd, "tpm", 0);
    u32 spin = param(cmd, "spin", 0);
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
    if (tpm)
        tpm_startup();
    if (!spin)
        timer_init();
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
        while ((long long)(rdtsc() - next) < 0) {
            if (spin)
                __asm__ volatile("pause");
            else
                wait_for_interrupt();
        }
        next += period;
        u64 now = rdtsc();
        if ((long long)(now - next) > (long long)(period * 4))
            next = now + period; /* after a long stop (migration), do not race to catch up */
        /* Drop the TLB entry of the state page first: QEMU 7.2's TCG loses writes to a page whose
         * TLB entry outlives a dirty-bitmap sync (a hot page stays stale on the destination); a
         * fresh entry takes the slow path, which marks the page dirty again. */
        __asm__ volatile("invlpg (%0)" : : "r"(&state) : "memory");
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
            if (tpm)
                tpm_extend_and_print();
        }
    }
}
