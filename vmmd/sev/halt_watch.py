"""Noticing, on sev-es, a guest that halted with nothing left to wake it.

With the in-kernel irqchip (which SEV-ES needs, QEMU target/i386/sev.c), KVM handles HLT itself: the vCPU
blocks inside KVM_RUN (x86.c kvm_emulate_halt() -> kvm_vcpu_halt(), then vcpu_block()) and userspace never sees
KVM_EXIT_HLT, so a guest ending in `cli; hlt` would only stop at --timeout. `HaltWatch` kicks every vCPU out of
KVM_RUN now and then (kvm_run.immediate_exit plus a signal: KVM_RUN returns EINTR, the vCPU stays halted) and,
on the vCPU's own thread, asks:

- KVM_GET_MP_STATE: KVM_MP_STATE_HALTED (x86.c kvm_arch_vcpu_ioctl_get_mpstate()), or a state only another
  vCPU's INIT/SIPI ends (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_AP_RESET_HOLD);
- kvm_run.if_flag, which post_kvm_run_save() fills on every return, EINTR included. For SEV-ES guests RFLAGS is
  encrypted and svm.c svm_get_if_flag() reads the guest's IF from the VMCB's int_state
  (SVM_GUEST_INTERRUPT_MASK) instead: this much of the protected state KVM can see, so vmmd can too.

When every vCPU is halted with interrupts off (or waits for a SIPI) in two consecutive sweeps, nothing can wake
any of them (no NMI source exists in vmmd's machine), and the VM stops as "halt" (exit 7), as it does on the
platforms where HLT reaches userspace. A halted vCPU with IF set keeps waiting: an interrupt may come.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmmd.errors import ExitCode, VmStop
from vmmd.kvm import uapi

IF_FLAG_OFFSET = uapi.kvm_run.if_flag.offset
WAITING_FOR_SIPI = (uapi.KVM_MP_STATE_UNINITIALIZED, uapi.KVM_MP_STATE_AP_RESET_HOLD)
SWEEP_SECONDS = 0.5  # how often every vCPU is asked; a dead guest is noticed after about two sweeps


class HaltWatch:
    """Decides from each vCPU's answers; `sweep()` (kicks) and `check(vcpu)` (on the vCPU's thread) feed it."""

    def __init__(self, vcpu_count: int, kick: Callable[[], None], interval: float = SWEEP_SECONDS) -> None:
        self.vcpu_count = vcpu_count
        self.kick = kick
        self.interval = interval
        self.sweep_number = 0
        self._seen: list[dict[int, bool]] = [{} for _ in range(vcpu_count)]  # vCPU -> {sweep: unwakeable}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the kicking side ------------------------------------------------------------------------------------
    def sweep(self) -> None:
        with self._lock:
            self.sweep_number += 1
        self.kick()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="halt-watch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * self.interval + 1)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sweep()

    # --- the vCPU side ---------------------------------------------------------------------------------------
    def check(self, vcpu) -> None:
        """After a KVM_RUN that returned EINTR, on `vcpu`'s thread. Raises VmStop when no vCPU can run again."""
        mp_state = vcpu.get_mp_state()
        interrupts_off = not vcpu.run_bytes[IF_FLAG_OFFSET]
        unwakeable = (mp_state == uapi.KVM_MP_STATE_HALTED and interrupts_off) or mp_state in WAITING_FOR_SIPI
        self.record(vcpu.index, unwakeable)

    def record(self, index: int, unwakeable: bool) -> None:
        with self._lock:
            now = self.sweep_number
            seen = self._seen[index]
            seen[now] = unwakeable
            for old in [s for s in seen if s < now - 1]:
                del seen[old]
            if now < 2 or not all(s.get(now) and s.get(now - 1) for s in self._seen):
                return
        raise VmStop("halt", "guest halted with interrupts off and nothing to wake it (every vCPU in "
                     "KVM_MP_STATE_HALTED with kvm_run.if_flag 0, or waiting for a SIPI, in two sweeps)",
                     ExitCode.GUEST_HALTED)
