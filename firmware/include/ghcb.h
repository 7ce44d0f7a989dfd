/*
 * GHCB layout and protocol constants, guest side.
 *
 * Mirrors Linux arch/x86/include/asm/svm.h (struct ghcb, struct ghcb_save_area),
 * arch/x86/include/asm/sev-common.h (GHCB MSR protocol) and
 * arch/x86/include/uapi/asm/svm.h (exit codes); AMD GHCB specification 56421.
 * Offsets are byte offsets into the 4 KiB GHCB page; the valid-bitmap bit of a
 * save-area field is its offset / 8.
 */
#ifndef VMMD_GHCB_H
#define VMMD_GHCB_H

#define MSR_AMD64_SEV_ES_GHCB 0xC0010130u /* GHCB MSR */
#define MSR_AMD64_SEV         0xC0010131u /* SEV_STATUS */
#define MSR_AMD64_SEV_ENABLED    (1u << 0)
#define MSR_AMD64_SEV_ES_ENABLED (1u << 1)

/* struct ghcb_save_area field offsets (svm.h) */
#define GHCB_OFF_CPL            0x0CB
#define GHCB_OFF_XSS            0x140
#define GHCB_OFF_RAX            0x1F8
#define GHCB_OFF_RCX            0x308
#define GHCB_OFF_RDX            0x310
#define GHCB_OFF_RBX            0x318
#define GHCB_OFF_RSI            0x330
#define GHCB_OFF_SW_EXIT_CODE   0x390
#define GHCB_OFF_SW_EXIT_INFO_1 0x398
#define GHCB_OFF_SW_EXIT_INFO_2 0x3A0
#define GHCB_OFF_SW_SCRATCH     0x3A8
#define GHCB_OFF_XCR0           0x3E8
#define GHCB_OFF_VALID_BITMAP   0x3F0 /* u8[16] */
#define GHCB_OFF_SHARED_BUFFER  0x800 /* u8[2032] */
#define GHCB_SHARED_BUFFER_SIZE 2032
#define GHCB_OFF_PROTOCOL_VER   0xFFA /* u16 */
#define GHCB_OFF_USAGE          0xFFC /* u32, 0 = standard usage */

#define GHCB_PROTOCOL_MIN 1
#define GHCB_PROTOCOL_MAX 2

/* GHCB MSR protocol (sev-common.h): low 12 bits = request/response code */
#define GHCB_MSR_INFO_MASK      0xFFFull
#define GHCB_MSR_SEV_INFO_RESP  0x001
#define GHCB_MSR_SEV_INFO_REQ   0x002
#define GHCB_MSR_CPUID_REQ      0x004
#define GHCB_MSR_CPUID_RESP     0x005
#define GHCB_MSR_TERM_REQ       0x100
/* SEV_INFO response: max version [63:48], min version [47:32], C-bit [31:24] */
#define GHCB_MSR_PROTO_MAX(v) ((unsigned)(((v) >> 48) & 0xFFFF))
#define GHCB_MSR_PROTO_MIN(v) ((unsigned)(((v) >> 32) & 0xFFFF))
#define GHCB_MSR_CBIT(v)      ((unsigned)(((v) >> 24) & 0xFF))
/* CPUID request: function [63:32], register [31:30] (0 EAX, 1 EBX, 2 ECX, 3 EDX) */
#define GHCB_MSR_CPUID(fn, reg) (((unsigned long long)(fn) << 32) | ((unsigned long long)(reg) << 30) | GHCB_MSR_CPUID_REQ)
/* termination request: reason set [15:12], reason code [23:16] */
#define GHCB_MSR_TERM(set, code) \
	((((unsigned long long)(code) & 0xFF) << 16) | (((unsigned long long)(set) & 0xF) << 12) | GHCB_MSR_TERM_REQ)
#define GHCB_SEV_TERM_SET_GEN          0
#define GHCB_SEV_ES_GEN_REQ            0 /* general request failure */
#define GHCB_SEV_ES_PROT_UNSUPPORTED   1 /* no common protocol version */

/* NAE exit codes (uapi/asm/svm.h) */
#define SVM_EXIT_CPUID              0x072
#define SVM_EXIT_IOIO               0x07B
#define SVM_EXIT_MSR                0x07C
#define SVM_VMGEXIT_MMIO_READ       0x80000001u
#define SVM_VMGEXIT_MMIO_WRITE      0x80000002u
#define SVM_VMGEXIT_NMI_COMPLETE    0x80000003u
#define SVM_VMGEXIT_AP_HLT_LOOP     0x80000004u
#define SVM_VMGEXIT_AP_JUMP_TABLE   0x80000005u
#define SVM_VMGEXIT_SET_AP_JUMP_TABLE 0
#define SVM_VMGEXIT_GET_AP_JUMP_TABLE 1
#define SVM_VMGEXIT_HV_FEATURES     0x8000FFFDu
#define SVM_VMGEXIT_TERM_REQUEST    0x8000FFFEu
#define SVM_VMGEXIT_UNSUPPORTED_EVENT 0x8000FFFFu

/* SVM IOIO intercept information (exit_info_1), AMD APM vol. 2 15.10.2 */
#define IOIO_TYPE_IN   (1u << 0)
#define IOIO_TYPE_STR  (1u << 2)
#define IOIO_REP       (1u << 3)
#define IOIO_DATA_8    (1u << 4)
#define IOIO_DATA_16   (1u << 5)
#define IOIO_DATA_32   (1u << 6)
#define IOIO_ADDR_64   (1u << 9)
#define IOIO_PORT_SHIFT 16

/* sw_exit_info_1[31:0] result of a NAE event */
#define GHCB_RESULT_OK       0
#define GHCB_RESULT_EXCEPTION 1 /* sw_exit_info_2 = event to inject (vector in [7:0]) */
#define GHCB_RESULT_ERROR    2 /* sw_exit_info_2 = GHCB_ERR_* */
#define GHCB_RESULT_NO_OUTPUT 3 /* not from the VMM: an output the event must return had no valid bit */

/* sw_exit_info_2 when the result is GHCB_RESULT_ERROR (svm.h) */
#define GHCB_ERR_NOT_REGISTERED      1
#define GHCB_ERR_INVALID_USAGE       2
#define GHCB_ERR_INVALID_SCRATCH_AREA 3
#define GHCB_ERR_MISSING_INPUT       4
#define GHCB_ERR_INVALID_INPUT       5
#define GHCB_ERR_INVALID_EVENT       6

#endif /* VMMD_GHCB_H */
