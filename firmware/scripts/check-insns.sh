#!/bin/sh
# Refuse images with instructions the host's instruction emulator lacks or that
# must never run here: SSE/AVX (xmm/ymm/zmm), cmpxchg16b, xsave/xrstor family,
# and vmmcall/vmcall/vmgexit (`rep vmmcall`) anywhere except ghcb_vmgexit() (its
# SEV-ES-hardware branch; objdump prints `rep vmmcall` as `vmgexit`).
set -eu
elf=$1
bad=$(objdump -d --no-show-raw-insn "$elf" | awk -F '\t' '
	/^[0-9a-f]+ <.*>:$/ { fn = $0; sub(/^[0-9a-f]+ /, "", fn); next }
	/^ *[0-9a-f]+:\t/ {
		insn = $2
		if (insn ~ /%[xyz]mm|cmpxchg16b|xsave|xrstor|fxsave|fxrstor/) print fn " " $0
		else if (insn ~ /^(rep[a-z]* )?(vmmcall|vmgexit|vmcall)/ && fn != "<ghcb_vmgexit>:") print fn " " $0
	}
')
if [ -n "$bad" ]; then
	echo "$elf: forbidden instructions:" >&2
	echo "$bad" >&2
	exit 1
fi
