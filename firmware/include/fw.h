/*
 * vmmd firmware library: what every test guest links against (firmware/lib/).
 *
 * A guest defines `int guest_main(void)`; lib/start.S and lib/entry.c set up
 * (boot info, platform probe, GHCB version negotiation, #VC handler on real
 * SEV-ES hardware) and end the VM with fw_exit(return value).
 */
#ifndef VMMD_FW_H
#define VMMD_FW_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "bootinfo.h"
#include "ghcb.h"

/* ---- state set up before guest_main() runs ---------------------------- */
struct fw_state {
	const struct vmmd_bootinfo *bi; /* boot-info page (RSI at entry) */
	uint64_t cpu;                   /* vCPU index (RDI at entry) */
	uint32_t platform;              /* VMMD_PLATFORM_* found by probing, not read from bi */
	uint16_t console_port;
	uint16_t debug_exit_port;
	uint16_t doorbell_port;         /* sev-es-emu VMGEXIT port (CPUID 0x40000101 EAX) */
	uint16_t ghcb_version;          /* negotiated GHCB protocol version, 0 = no GHCB */
	uint32_t ghcb_cbit;             /* C-bit position from the SEV_INFO response */
	uint64_t sev_info;              /* raw SEV_INFO response */
	uint64_t ghcb_gpa;              /* this vCPU's GHCB page (identity mapped) */
	volatile uint8_t *ghcb;
};
extern struct fw_state fw;

int guest_main(void);            /* provided by each guest, runs on vCPU 0 */
void fw_ap_main(void);           /* weak; default parks the AP with cli; hlt */

/* ---- platform --------------------------------------------------------- */
static inline int fw_has_ghcb(void) { return fw.ghcb_version != 0; }
const char *fw_platform_name(uint32_t platform);

/* ---- end of the VM ----------------------------------------------------- */
/* isa-debug-exit write of `code` (0 = clean: status 1; else status (code<<1)|1);
 * on GHCB platforms as a GHCB IOIO event. Falls back to GHCB termination or hlt. */
__attribute__((noreturn)) void fw_exit(uint8_t code);
/* GHCB MSR protocol termination request (reason set [15:12], code [23:16]) */
__attribute__((noreturn)) void fw_terminate(unsigned set, unsigned code);
__attribute__((noreturn)) void fw_halt_forever(void);

/* ---- console (16550 THR at fw.console_port) ---------------------------- */
void fw_putc(char c);
void fw_puts(const char *s);      /* no newline added */
int fw_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int fw_snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int fw_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* ---- raw instructions --------------------------------------------------- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr) : "memory");
	return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
static inline void cpuid_insn(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static inline void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }

/* CPUID through the platform's path: GHCB event where a GHCB exists, else the
 * cpuid instruction. Returns 0 or a GHCB_RESULT_* value (r zeroed on failure). */
int fw_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]);

/* 1 if the identity map has a present translation for `gpa` (walks CR3). */
int fw_is_mapped(uint64_t gpa);

/* ---- GHCB client (lib/ghcb.c); all need fw_has_ghcb() ------------------ */
/* The VMGEXIT of this platform: `rep vmmcall` on sev-es hardware, an `outb` to
 * the doorbell port on sev-es-emu. Never call it on plain. */
void ghcb_vmgexit(void);
/* MSR protocol: write `request` to the GHCB MSR, VMGEXIT, return the GHCB MSR. */
uint64_t ghcb_msr_protocol(uint64_t request);
void ghcb_write_msr(uint64_t value);   /* every GHCB MSR write goes through here (ghcb_exit skips unchanged GPAs) */

/* Building blocks of a NAE event. ghcb_begin() clears the valid bitmap and sets
 * protocol_version / usage = 0; ghcb_set() stores a save-area qword and marks it
 * valid; ghcb_exit() sets sw_exit_code / info_1 / info_2, writes the GHCB GPA to
 * the GHCB MSR, does the VMGEXIT and returns sw_exit_info_1[31:0]. */
void ghcb_begin(void);
void ghcb_set(unsigned off, uint64_t value);
uint32_t ghcb_exit(uint64_t exit_code, uint64_t info1, uint64_t info2);
/* ghcb_begin() + ghcb_exit() for events without other inputs */
uint32_t ghcb_call(uint64_t exit_code, uint64_t info1, uint64_t info2);

static inline uint64_t ghcb_get(unsigned off) { return *(volatile uint64_t *)(fw.ghcb + off); }
static inline void ghcb_put(unsigned off, uint64_t v) { *(volatile uint64_t *)(fw.ghcb + off) = v; }
static inline int ghcb_is_valid(unsigned off) { return (fw.ghcb[GHCB_OFF_VALID_BITMAP + off / 64] >> ((off / 8) % 8)) & 1; }
static inline uint64_t ghcb_info2(void) { return ghcb_get(GHCB_OFF_SW_EXIT_INFO_2); }
static inline uint64_t ghcb_shared_gpa(void) { return fw.ghcb_gpa + GHCB_OFF_SHARED_BUFFER; }

/* Helpers; each returns the GHCB result (GHCB_RESULT_*). */
uint32_t ghcb_ioio_info(uint16_t port, unsigned size, int in, int string);
int ghcb_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]);
int ghcb_ioio_out(uint16_t port, unsigned size, uint32_t value);     /* size 1, 2, 4 */
int ghcb_ioio_in(uint16_t port, unsigned size, uint32_t *value);
int ghcb_ioio_outs(uint16_t port, unsigned size, const void *buf, unsigned count); /* rep outs */
int ghcb_ioio_ins(uint16_t port, unsigned size, void *buf, unsigned count);        /* rep ins */
int ghcb_rdmsr(uint32_t msr, uint64_t *value);
int ghcb_wrmsr(uint32_t msr, uint64_t value);
int ghcb_mmio_read(uint64_t gpa, void *buf, unsigned len);           /* len 1..8 */
int ghcb_mmio_write(uint64_t gpa, const void *buf, unsigned len);
int ghcb_nmi_complete(void);
int ghcb_ap_jump_table_set(uint64_t address);
int ghcb_ap_jump_table_get(uint64_t *address);
int ghcb_hv_features(uint64_t *features);
/* NAE termination request: exit_info_1 = reason set [3:0] | code [11:4] */
int ghcb_terminate_event(unsigned set, unsigned code);
/* MSR-protocol CPUID of one register (0 EAX .. 3 EDX); 0 ok, -1 bad response */
int ghcb_msr_cpuid(uint32_t leaf, unsigned reg, uint32_t *value);

/* ---- #VC (vector 29) handler, installed only on sev-es hardware (lib/vc.c) */
void fw_vc_install(void);

/* ---- string.h subset (gcc may emit calls to these) ---------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

#endif /* VMMD_FW_H */
