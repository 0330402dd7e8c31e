// Does a guest's XCR0 survive a VM exit? A check of the KVM host it runs
// on, with no pmemvm in it: a real-mode guest sets XCR0 to x87|SSE with
// XSETBV, then reads it back with XGETBV after each of ten exits to this
// program (an `out`).
//
// On a correct host KVM intercepts XSETBV, records the guest's value and
// loads it at every VM entry. Where the hypervisor under KVM does not
// deliver that intercept (QEMU 7.2's SVM emulation has none), the guest
// writes the CPU's XCR0 directly, KVM's copy stays at its reset value
// (x87 only), and KVM loads that copy at the next entry: the guest's XCR0
// changes under it. Exit status 0: XCR0 held; 1: it did not; 2: the check
// could not run (no XSAVE, no KVM).
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define CODE 0x1000
#define PORT 0x10
#define XCR0_WANT 0x3
#define ROUNDS 10

static void __attribute__((noreturn)) die(const char *what)
{
	fprintf(stderr, "xcr0-check: %s: %s\n", what, strerror(errno));
	exit(2);
}

int main(void)
{
	// 16-bit code: ecx = 0; edx:eax = XCR0_WANT; xsetbv;
	// again: ecx = 0; xgetbv; out PORT, al; jmp again
	static const uint8_t code[] = {
		0x66, 0x31, 0xc9,				// xor ecx, ecx
		0x66, 0xb8, XCR0_WANT, 0, 0, 0,			// mov eax, XCR0_WANT
		0x66, 0x31, 0xd2,				// xor edx, edx
		0x0f, 0x01, 0xd1,				// xsetbv
		0x66, 0x31, 0xc9,				// again: xor ecx, ecx
		0x0f, 0x01, 0xd0,				// xgetbv
		0xe6, PORT,					// out PORT, al
		0xeb, 0xf6,					// jmp again
	};
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	size_t size = 0x10000;
	uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	memcpy(mem + CODE, code, sizeof(code));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region))
		die("KVM_SET_USER_MEMORY_REGION");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");

	// The guest gets the host's supported CPUID, so XSAVE where KVM has it.
	int n = 256;
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = n;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid))
		die("KVM_GET_SUPPORTED_CPUID");
	int xsave = 0;
	for (unsigned i = 0; i < cpuid->nent; i++)
		if (cpuid->entries[i].function == 1)
			xsave = !!(cpuid->entries[i].ecx & (1u << 26));
	if (!xsave) {
		printf("xcr0-check: KVM offers no XSAVE here (CPU model without it): nothing to check\n");
		return 2;
	}
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid))
		die("KVM_SET_CPUID2");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs))
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	sregs.cr4 |= 1u << 18; // OSXSAVE: XSETBV and XGETBV allowed
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs))
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = CODE, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs))
		die("KVM_SET_REGS");

	long run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	int bad = 0;
	for (int round = 0; round < ROUNDS; round++) {
		if (ioctl(vcpu, KVM_RUN, 0))
			die("KVM_RUN");
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != PORT) {
			fprintf(stderr, "xcr0-check: unexpected exit %u\n", run->exit_reason);
			return 2;
		}
		uint8_t seen = *((uint8_t *)run + run->io.data_offset);
		struct kvm_xcrs xcrs = { 0 };
		ioctl(vcpu, KVM_GET_XCRS, &xcrs);
		printf("xcr0-check: exit %d: the guest reads XCR0 = %#x (KVM's copy %#llx)\n", round,
		       seen, (unsigned long long)xcrs.xcrs[0].value);
		bad |= seen != XCR0_WANT;
	}
	if (bad) {
		printf("xcr0-check: FAILED: the guest set XCR0 = %#x and it did not hold across VM exits:"
		       " KVM never saw the XSETBV (the hypervisor below it does not intercept it)\n",
		       XCR0_WANT);
		return 1;
	}
	printf("xcr0-check: ok: XCR0 = %#x held across %d VM exits\n", XCR0_WANT, ROUNDS);
	return 0;
}
