//! The probe program: a position-independent x86-64 routine that runs at
//! CPL3 in the probe VM, and the parameter block it reads.
//!
//! The VMM copies the bytes between `pmemvm_probe_start` and
//! `pmemvm_probe_end` into guest memory and starts the vCPU there with RDI
//! pointing at the parameter block. The routine walks a list of steps:
//! - read or write: touch `count` pages of the pmem region, one 8-byte
//!   access per page, timing each access with
//!   `lfence; rdtsc; lfence; access; rdtscp; lfence` and storing the tick
//!   delta (u64) in the step's results array;
//! - flush: send a real virtio-pmem FLUSH request (publish descriptor 0 in
//!   the avail ring, write the queue index to QueueNotify, spin on the used
//!   index) and store the ticks from request to completion.
//!
//! After each step it writes the number of steps done to the control
//! page's [`CONTROL_STEP`] register, an MMIO exit where the VMM samples its
//! counters; at the end it writes the status to [`CONTROL_EXIT`] (0 =
//! success, see [`ProbeExitCode`]). It uses no stack, no interrupts and no
//! guest kernel. An exception (say #UD for an instruction the CPU model
//! lacks) enters one of the [`VECTORS`] stubs at CPL0, which stores the
//! vector, error code and RIP in the parameter header and writes the vector
//! to [`CONTROL_FAULT`]: the VMM reports it, where a triple fault would
//! leave nothing to read (on SVM, KVM resets the vCPU on shutdown).
//!
//! Why MMIO and not `out` to the exit port: on nested shadow-paging KVM
//! (kvm_pvm) `out` at CPL3 raises #GP even with RFLAGS.IOPL = 3, and with
//! no IDT that is a triple fault. A store to an unbacked guest-physical
//! page through a 4 KiB mapping exits to the VMM everywhere.
//!
//! Page order: the page of access `i` is `first_page + stride * p(i)`,
//! where `p` is the identity (sequential, stride) or the full-period LCG
//! `x = (A * x + C) mod 2^k` restricted to `x < span` (random), which
//! visits every page of the window exactly once.

use std::arch::global_asm;

/// Offsets in the probe's control page (an MMIO page no device claims).
/// The probe writes the number of steps done here after every step...
pub const CONTROL_STEP: u64 = 0;
/// ...and its exit status here at the end.
pub const CONTROL_EXIT: u64 = 8;
/// The exception handler writes the vector here.
pub const CONTROL_FAULT: u64 = 16;
/// The crash routine writes an acknowledged sequence number here.
pub const CONTROL_ACK: u64 = 24;
/// Exception vectors with a stub; each stub is [`VECTOR_STUB`] bytes.
pub const VECTORS: u8 = 32;
pub const VECTOR_STUB: usize = 16;
pub const PROBE_MAGIC: u64 = 0x6562_6f72_706d_6d70; // "pmmprobe"

/// Multiplier and increment of the probe's LCG (Knuth's MMIX); A = 1 mod 4
/// and odd C give a full period modulo every power of two.
pub const LCG_A: u64 = 6_364_136_223_846_793_005;
pub const LCG_C: u64 = 1_442_695_040_888_963_407;

// Parameter header, at the start of the parameter pages.
pub const HDR_MAGIC: usize = 0;
pub const HDR_REGION: usize = 8;
pub const HDR_MMIO: usize = 16;
pub const HDR_AVAIL: usize = 24;
pub const HDR_USED: usize = 32;
pub const HDR_RESPONSE: usize = 40;
pub const HDR_QUEUE_MASK: usize = 48;
pub const HDR_STEPS_DONE: usize = 56;
pub const HDR_CONTROL: usize = 64;
pub const HDR_FAULT_VECTOR: usize = 72;
pub const HDR_FAULT_ERROR: usize = 80;
pub const HDR_FAULT_RIP: usize = 88;
/// Where the step list starts, from the start of the parameter pages.
pub const STEPS_OFFSET: usize = 0x100;

// One step, STEP_SIZE bytes.
pub const STEP_OP: usize = 0;
pub const STEP_ORDER: usize = 4;
pub const STEP_COUNT: usize = 8;
pub const STEP_FIRST_PAGE: usize = 16;
pub const STEP_STRIDE: usize = 24;
pub const STEP_SPAN: usize = 32;
pub const STEP_SEED: usize = 40;
pub const STEP_RESULTS: usize = 48;
pub const STEP_MASK: usize = 56;
pub const STEP_SIZE: usize = 64;

// The crash routine's own fields, after the shared header (one header per
// vCPU; the control, MMIO, queue and fault fields are the probe's).
pub const CR_AREA: usize = 0x100;
pub const CR_RECORDS: usize = 0x108;
pub const CR_SHARED: usize = 0x110;
pub const CR_HEAD: usize = 0x118;
pub const CR_LOCK: usize = 0x120;
pub const CR_SEED: usize = 0x128;
pub const CR_TAG: usize = 0x130;
pub const CR_FLUSH_MASK: usize = 0x138;
pub const CR_SEQ: usize = 0x140;
pub const CR_ACKED: usize = 0x148;
pub const CR_INFLIGHT_MAX: usize = 0x150;
/// Bytes per crash header.
pub const CRASH_HEADER_SIZE: usize = 0x200;
/// One record: eight u64 words, see [`crash_record`].
pub const RECORD_SIZE: u64 = 64;
/// The odd multiplier of the record's words and checksum.
pub const RECORD_K: u64 = 0x9e37_79b9_7f4a_7c15;
/// Word 1 of a record: this, with the vCPU index in the low byte.
pub const RECORD_MAGIC: u64 = 0x706d_656d_6372_7300; // "pmemcrs\0"

/// The record the crash routine writes for sequence number `seq` of the
/// vCPU whose tag is `tag`: word 0 is `seq`, word 1 the tag, words 2..6
/// `(seq + i) * K`, word 7 a checksum folding words 0..6. A record the
/// host reads back is intact only if all eight words match.
pub fn crash_record(seq: u64, tag: u64) -> [u64; 8] {
    let mut w = [0u64; 8];
    w[0] = seq;
    w[1] = tag;
    for (i, word) in w.iter_mut().enumerate().take(7).skip(2) {
        *word = seq.wrapping_add(i as u64).wrapping_mul(RECORD_K);
    }
    let mut h = w[0];
    for word in &w[1..7] {
        h = (h ^ word).wrapping_mul(RECORD_K);
    }
    w[7] = h;
    w
}

/// The word-1 tag of vCPU `vcpu`'s records.
pub fn record_tag(vcpu: u8) -> u64 {
    RECORD_MAGIC | u64::from(vcpu)
}

pub const OP_END: u32 = 0;
pub const OP_READ: u32 = 1;
pub const OP_WRITE: u32 = 2;
pub const OP_FLUSH: u32 = 3;
pub const ORDER_STRIDE: u32 = 0;
pub const ORDER_RANDOM: u32 = 1;

/// virtio-mmio QueueNotify, from the device's MMIO base.
const QUEUE_NOTIFY: usize = devices::virtio::mmio::NOTIFY_OFFSET as usize;

/// The status the probe reports at [`CONTROL_EXIT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeExitCode {
    Done,
    UnknownOp,
    FlushFailed,
    /// The crash routine wrote its last record slot.
    AreaFull,
    Other(u8),
}

impl From<u8> for ProbeExitCode {
    fn from(v: u8) -> Self {
        match v {
            0 => Self::Done,
            1 => Self::UnknownOp,
            2 => Self::FlushFailed,
            3 => Self::AreaFull,
            v => Self::Other(v),
        }
    }
}

// Register use: rdi = parameter header, r15 = current step, r8 = window
// base address, r9 = stride in bytes, r10 = i, r11 = count, r12 = results,
// r13 = LCG state (flush: the avail index), rbx = LCG mask, rbp = span,
// r14 = start timestamp, rsi = address; rax, rcx, rdx are scratch
// (rdtscp writes all three).
global_asm!(
    ".pushsection .text.pmemvm_probe,\"ax\",@progbits",
    ".balign 16",
    ".globl pmemvm_probe_start",
    "pmemvm_probe_start:",
    "    lea r15, [rdi + {steps}]",
    ".Lprobe_next_step:",
    "    mov eax, dword ptr [r15 + {op}]",
    "    cmp eax, {op_end}",
    "    je .Lprobe_finish",
    "    cmp eax, {op_read}",
    "    je .Lprobe_read",
    "    cmp eax, {op_write}",
    "    je .Lprobe_write",
    "    cmp eax, {op_flush}",
    "    je .Lprobe_flush",
    "    mov eax, 1",
    "    jmp .Lprobe_exit",
    // Both access loops share this shape; only the access differs.
    ".macro PROBE_ACCESS_LOOP kind",
    ".Lprobe_\\kind:",
    "    mov r8, qword ptr [r15 + {first_page}]",
    "    shl r8, 12",
    "    add r8, qword ptr [rdi + {region}]",
    "    mov r9, qword ptr [r15 + {stride}]",
    "    shl r9, 12",
    "    xor r10d, r10d",
    "    mov r11, qword ptr [r15 + {count}]",
    "    mov r12, qword ptr [r15 + {results}]",
    "    mov rbp, qword ptr [r15 + {span}]",
    "    mov rbx, qword ptr [r15 + {mask}]",
    "    mov r13, qword ptr [r15 + {seed}]",
    ".Lprobe_\\kind\\()_loop:",
    "    cmp r10, r11",
    "    jae .Lprobe_step_done",
    "    mov rsi, r10",
    "    cmp dword ptr [r15 + {order}], {order_random}",
    "    jne .Lprobe_\\kind\\()_address",
    ".Lprobe_\\kind\\()_lcg:",
    "    movabs rax, {lcg_a}",
    "    imul r13, rax",
    "    movabs rax, {lcg_c}",
    "    add r13, rax",
    "    and r13, rbx",
    "    cmp r13, rbp",
    "    jae .Lprobe_\\kind\\()_lcg",
    "    mov rsi, r13",
    ".Lprobe_\\kind\\()_address:",
    "    imul rsi, r9",
    "    add rsi, r8",
    "    lfence",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r14, rax",
    "    lfence",
    ".ifc \\kind,read",
    "    mov rax, qword ptr [rsi]",
    ".else",
    "    mov qword ptr [rsi], r14",
    ".endif",
    "    rdtscp",
    "    lfence",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    sub rax, r14",
    "    mov qword ptr [r12 + r10 * 8], rax",
    "    inc r10",
    "    jmp .Lprobe_\\kind\\()_loop",
    ".endm",
    "PROBE_ACCESS_LOOP read",
    "PROBE_ACCESS_LOOP write",
    ".Lprobe_flush:",
    "    xor r10d, r10d",
    "    mov r11, qword ptr [r15 + {count}]",
    "    mov r12, qword ptr [r15 + {results}]",
    ".Lprobe_flush_loop:",
    "    cmp r10, r11",
    "    jae .Lprobe_step_done",
    // ret = ~0, so a completion that wrote nothing is seen as a failure.
    "    mov rsi, qword ptr [rdi + {response}]",
    "    mov dword ptr [rsi], 0xffffffff",
    // avail.ring[idx % size] = descriptor 0 (the request chain 0 -> 1).
    "    mov rsi, qword ptr [rdi + {avail}]",
    "    movzx r13d, word ptr [rsi + 2]",
    "    mov rcx, r13",
    "    and rcx, qword ptr [rdi + {queue_mask}]",
    "    mov word ptr [rsi + 4 + rcx * 2], 0",
    "    inc r13d",
    "    movzx r13d, r13w",
    "    mov rbx, qword ptr [rdi + {used}]",
    "    mov rbp, qword ptr [rdi + {mmio}]",
    "    lfence",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r14, rax",
    "    lfence",
    // Publish, then notify queue 0: an ioeventfd, no exit to the VMM.
    "    mov word ptr [rsi + 2], r13w",
    "    mfence",
    "    mov dword ptr [rbp + {queue_notify}], 0",
    ".Lprobe_flush_spin:",
    "    pause",
    "    cmp word ptr [rbx + 2], r13w",
    "    jne .Lprobe_flush_spin",
    "    rdtscp",
    "    lfence",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    sub rax, r14",
    "    mov qword ptr [r12 + r10 * 8], rax",
    "    mov rsi, qword ptr [rdi + {response}]",
    "    cmp dword ptr [rsi], 0",
    "    jne .Lprobe_flush_failed",
    "    inc r10",
    "    jmp .Lprobe_flush_loop",
    ".Lprobe_flush_failed:",
    "    mov eax, 2",
    "    jmp .Lprobe_exit",
    // The crash routine: a second entry point into the same code, so it
    // shares the exception stubs and the exit path. Per vCPU: append
    // records to its own area, store the newest sequence number in its
    // slot of the shared page (one 8-byte store, racing the other vCPUs
    // on that page), and every 1..=mask+1 records send a flush request for
    // everything written so far. Half the flushes are waited for at once;
    // during the others up to CR_INFLIGHT_MAX more records are written. When a
    // flush completes, its sequence number is acknowledged at CONTROL_ACK.
    // rdi = header, r8 = seq, r9 = seq of the flush in flight (0: none),
    // r10 = seq at which the next flush goes out, r11 = LCG state,
    // r12 = area, r13 = record slots, rbx = shared slot, rbp = response,
    // r14 = checksum; rax, rcx, rdx, rsi scratch.
    ".balign 16",
    ".globl pmemvm_crash_entry",
    "pmemvm_crash_entry:",
    "    xor r8d, r8d",
    "    xor r9d, r9d",
    "    mov r11, qword ptr [rdi + {cr_seed}]",
    "    mov r12, qword ptr [rdi + {cr_area}]",
    "    mov r13, qword ptr [rdi + {cr_records}]",
    "    mov rbx, qword ptr [rdi + {cr_shared}]",
    "    mov rbp, qword ptr [rdi + {response}]",
    "    mov r10, 1",
    ".Lcrash_loop:",
    "    cmp r8, r13",
    "    jae .Lcrash_full",
    "    inc r8",
    "    mov qword ptr [rdi + {cr_seq}], r8",
    "    lea rsi, [r8 - 1]",
    "    shl rsi, 6",
    "    add rsi, r12",
    "    movabs rcx, {record_k}",
    "    mov qword ptr [rsi], r8",
    "    mov r14, r8",
    "    mov rax, qword ptr [rdi + {cr_tag}]",
    "    mov qword ptr [rsi + 8], rax",
    "    xor r14, rax",
    "    imul r14, rcx",
    ".irp i, 2,3,4,5,6",
    "    lea rax, [r8 + \\i]",
    "    imul rax, rcx",
    "    mov qword ptr [rsi + 8 * \\i], rax",
    "    xor r14, rax",
    "    imul r14, rcx",
    ".endr",
    "    mov qword ptr [rsi + 56], r14",
    "    mov qword ptr [rbx], r8",
    "    test r9, r9",
    "    jz .Lcrash_maybe_flush",
    "    mov eax, dword ptr [rbp]",
    "    cmp eax, 0xffffffff",
    "    jne .Lcrash_completed",
    // Still in flight: go on writing, up to CR_INFLIGHT_MAX records past
    // the flush, then wait for it, so each flush stays small.
    "    mov rax, r8",
    "    sub rax, r9",
    "    cmp rax, qword ptr [rdi + {cr_inflight_max}]",
    "    jb .Lcrash_loop",
    "    jmp .Lcrash_wait",
    ".Lcrash_completed:",
    "    test eax, eax",
    "    jnz .Lcrash_flush_failed",
    "    mov rdx, qword ptr [rdi + {control}]",
    "    mov qword ptr [rdx + {control_ack}], r9",
    "    mov qword ptr [rdi + {cr_acked}], r9",
    "    xor r9d, r9d",
    "    jmp .Lcrash_loop",
    ".Lcrash_maybe_flush:",
    "    cmp r8, r10",
    "    jb .Lcrash_loop",
    // ret = ~0 until the device answers; then take the queue lock (the
    // avail ring has one producer at a time), publish this vCPU's chain,
    // drop the lock and notify (an ioeventfd: no exit).
    "    mov dword ptr [rbp], 0xffffffff",
    "    mov rdx, qword ptr [rdi + {cr_lock}]",
    ".Lcrash_lock:",
    "    xor eax, eax",
    "    mov ecx, 1",
    "    lock cmpxchg dword ptr [rdx], ecx",
    "    jz .Lcrash_locked",
    "    pause",
    "    jmp .Lcrash_lock",
    ".Lcrash_locked:",
    "    mov rsi, qword ptr [rdi + {avail}]",
    "    movzx eax, word ptr [rsi + 2]",
    "    mov rcx, rax",
    "    and rcx, qword ptr [rdi + {queue_mask}]",
    "    mov r14, qword ptr [rdi + {cr_head}]",
    "    mov word ptr [rsi + 4 + rcx * 2], r14w",
    "    inc eax",
    "    mov word ptr [rsi + 2], ax",
    "    mov dword ptr [rdx], 0",
    "    mfence",
    "    mov rdx, qword ptr [rdi + {mmio}]",
    "    mov dword ptr [rdx + {queue_notify}], 0",
    "    mov r9, r8",
    "    movabs rax, {lcg_a}",
    "    imul r11, rax",
    "    movabs rax, {lcg_c}",
    "    add r11, rax",
    "    mov rax, r11",
    "    shr rax, 33",
    "    and rax, qword ptr [rdi + {cr_flush_mask}]",
    "    lea r10, [r8 + rax + 1]",
    "    bt r11, 62",
    "    jnc .Lcrash_loop",
    ".Lcrash_wait:",
    "    pause",
    "    mov eax, dword ptr [rbp]",
    "    cmp eax, 0xffffffff",
    "    je .Lcrash_wait",
    "    jmp .Lcrash_completed",
    ".Lcrash_full:",
    "    mov eax, 3",
    "    jmp .Lprobe_exit",
    ".Lcrash_flush_failed:",
    "    mov eax, 2",
    "    jmp .Lprobe_exit",
    // Exception stubs, one per vector, VECTOR_STUB bytes apart. The CPU
    // pushes an error code for some vectors; the others push a 0 so that
    // the frame is the same.
    ".balign 16",
    ".globl pmemvm_probe_vectors",
    "pmemvm_probe_vectors:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    ".balign 16",
    ".if (\\v == 8) || ((\\v >= 10) && (\\v <= 14)) || (\\v == 17) || (\\v == 21) || (\\v == 29) || (\\v == 30)",
    "    push \\v",
    ".else",
    "    push 0",
    "    push \\v",
    ".endif",
    "    jmp .Lprobe_exception",
    ".endr",
    // At CPL0 on the TSS's RSP0 stack: vector, error code, RIP, CS, ...
    // RDI still points at the parameter header.
    ".Lprobe_exception:",
    "    mov rax, qword ptr [rsp + 8]",
    "    mov qword ptr [rdi + {fault_error}], rax",
    "    mov rax, qword ptr [rsp + 16]",
    "    mov qword ptr [rdi + {fault_rip}], rax",
    "    mov rax, qword ptr [rsp]",
    "    mov qword ptr [rdi + {fault_vector}], rax",
    "    mov rdx, qword ptr [rdi + {control}]",
    "    mov qword ptr [rdx + {control_fault}], rax",
    "    jmp .Lprobe_hang",
    ".Lprobe_step_done:",
    "    mov rax, qword ptr [rdi + {steps_done}]",
    "    inc rax",
    "    mov qword ptr [rdi + {steps_done}], rax",
    "    mov rdx, qword ptr [rdi + {control}]",
    "    mov qword ptr [rdx + {control_step}], rax",
    "    add r15, {step_size}",
    "    jmp .Lprobe_next_step",
    ".Lprobe_finish:",
    "    xor eax, eax",
    ".Lprobe_exit:",
    "    mov rdx, qword ptr [rdi + {control}]",
    "    mov qword ptr [rdx + {control_exit}], rax",
    ".Lprobe_hang:",
    "    pause",
    "    jmp .Lprobe_hang",
    ".globl pmemvm_probe_end",
    "pmemvm_probe_end:",
    ".popsection",
    steps = const STEPS_OFFSET,
    op = const STEP_OP,
    order = const STEP_ORDER,
    count = const STEP_COUNT,
    first_page = const STEP_FIRST_PAGE,
    stride = const STEP_STRIDE,
    span = const STEP_SPAN,
    seed = const STEP_SEED,
    results = const STEP_RESULTS,
    mask = const STEP_MASK,
    step_size = const STEP_SIZE,
    region = const HDR_REGION,
    mmio = const HDR_MMIO,
    avail = const HDR_AVAIL,
    used = const HDR_USED,
    response = const HDR_RESPONSE,
    queue_mask = const HDR_QUEUE_MASK,
    steps_done = const HDR_STEPS_DONE,
    queue_notify = const QUEUE_NOTIFY,
    op_end = const OP_END,
    op_read = const OP_READ,
    op_write = const OP_WRITE,
    op_flush = const OP_FLUSH,
    order_random = const ORDER_RANDOM,
    lcg_a = const LCG_A,
    lcg_c = const LCG_C,
    control = const HDR_CONTROL,
    control_step = const CONTROL_STEP,
    control_exit = const CONTROL_EXIT,
    control_fault = const CONTROL_FAULT,
    fault_vector = const HDR_FAULT_VECTOR,
    fault_error = const HDR_FAULT_ERROR,
    fault_rip = const HDR_FAULT_RIP,
    control_ack = const CONTROL_ACK,
    cr_area = const CR_AREA,
    cr_records = const CR_RECORDS,
    cr_shared = const CR_SHARED,
    cr_head = const CR_HEAD,
    cr_lock = const CR_LOCK,
    cr_seed = const CR_SEED,
    cr_tag = const CR_TAG,
    cr_flush_mask = const CR_FLUSH_MASK,
    cr_seq = const CR_SEQ,
    cr_acked = const CR_ACKED,
    cr_inflight_max = const CR_INFLIGHT_MAX,
    record_k = const RECORD_K,
);

extern "C" {
    static pmemvm_probe_start: u8;
    static pmemvm_crash_entry: u8;
    static pmemvm_probe_vectors: u8;
    static pmemvm_probe_end: u8;
}

/// Where the exception stubs start in [`probe_code`]; vector `v`'s stub is
/// [`VECTOR_STUB`] `* v` bytes further.
pub fn vectors_offset() -> usize {
    // Both are labels in the global_asm! block above; only their addresses
    // are taken.
    std::ptr::addr_of!(pmemvm_probe_vectors) as usize
        - std::ptr::addr_of!(pmemvm_probe_start) as usize
}

/// Where the crash routine starts in [`probe_code`].
pub fn crash_entry_offset() -> usize {
    // Labels in the global_asm! block above; only their addresses are
    // taken.
    std::ptr::addr_of!(pmemvm_crash_entry) as usize
        - std::ptr::addr_of!(pmemvm_probe_start) as usize
}

/// The usual name of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE (divide error)",
        1 => "#DB (debug)",
        2 => "NMI",
        3 => "#BP (breakpoint)",
        4 => "#OF (overflow)",
        5 => "#BR (bound range)",
        6 => "#UD (invalid opcode: an instruction this CPU model lacks?)",
        7 => "#NM (device not available)",
        8 => "#DF (double fault)",
        10 => "#TS (invalid TSS)",
        11 => "#NP (segment not present)",
        12 => "#SS (stack fault)",
        13 => "#GP (general protection)",
        14 => "#PF (page fault)",
        16 => "#MF (x87 error)",
        17 => "#AC (alignment check)",
        18 => "#MC (machine check)",
        19 => "#XM (SIMD error)",
        20 => "#VE (virtualization exception)",
        21 => "#CP (control protection)",
        _ => "reserved vector",
    }
}

/// The probe routine's machine code.
pub fn probe_code() -> &'static [u8] {
    // SAFETY: both symbols are labels in the one global_asm! block above,
    // start before end, in a section of the binary that is mapped readable
    // (and never written) for the whole life of the process; only their
    // addresses are taken here.
    unsafe {
        let start = std::ptr::addr_of!(pmemvm_probe_start);
        let end = std::ptr::addr_of!(pmemvm_probe_end);
        std::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

/// The order in which a step visits the pages of its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PageOrder {
    /// Pages `first, first + stride, first + 2 * stride, ...`.
    Stride { stride: u64 },
    /// Every page of the window once, in LCG order from `seed`, each
    /// `stride` pages apart.
    Random { stride: u64, seed: u64 },
}

impl PageOrder {
    pub fn stride(self) -> u64 {
        match self {
            Self::Stride { stride } | Self::Random { stride, .. } => stride,
        }
    }
}

/// What one step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOp {
    Read,
    Write,
    Flush,
}

/// One step of the probe program, as the VMM describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSpec {
    pub op: StepOp,
    /// Pages touched, or flush requests sent.
    pub count: u64,
    /// First page of the window, from the start of the pmem region.
    pub first_page: u64,
    pub order: PageOrder,
}

impl StepSpec {
    /// Pages of the region the step's window spans.
    pub fn window_pages(&self) -> u64 {
        match self.op {
            StepOp::Flush => 0,
            _ => self.count * self.order.stride(),
        }
    }

    /// The step as the probe reads it; `results` is the guest address of
    /// its `count` u64 samples.
    pub fn encode(&self, results: u64) -> [u8; STEP_SIZE] {
        let mut raw = [0u8; STEP_SIZE];
        let (op, order, stride, seed) = match (self.op, self.order) {
            (StepOp::Flush, _) => (OP_FLUSH, ORDER_STRIDE, 1, 0),
            (op, PageOrder::Stride { stride }) => (op_code(op), ORDER_STRIDE, stride, 0),
            (op, PageOrder::Random { stride, seed }) => (op_code(op), ORDER_RANDOM, stride, seed),
        };
        let span = self.count;
        let mask = span.max(1).next_power_of_two() - 1;
        let put32 = |raw: &mut [u8; STEP_SIZE], at: usize, v: u32| {
            raw[at..at + 4].copy_from_slice(&v.to_le_bytes())
        };
        let put64 = |raw: &mut [u8; STEP_SIZE], at: usize, v: u64| {
            raw[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        put32(&mut raw, STEP_OP, op);
        put32(&mut raw, STEP_ORDER, order);
        put64(&mut raw, STEP_COUNT, self.count);
        put64(&mut raw, STEP_FIRST_PAGE, self.first_page);
        put64(&mut raw, STEP_STRIDE, stride);
        put64(&mut raw, STEP_SPAN, span);
        put64(&mut raw, STEP_SEED, seed & mask);
        put64(&mut raw, STEP_RESULTS, results);
        put64(&mut raw, STEP_MASK, mask);
        raw
    }

    /// The region pages the probe touches, in order: what the guest code
    /// computes, for tests and for host-side baselines.
    pub fn pages(&self) -> Vec<u64> {
        match self.order {
            PageOrder::Stride { stride } => (0..self.count)
                .map(|i| self.first_page + i * stride)
                .collect(),
            PageOrder::Random { stride, seed } => {
                let mask = self.count.max(1).next_power_of_two() - 1;
                let mut x = seed & mask;
                let mut out = Vec::with_capacity(self.count as usize);
                while (out.len() as u64) < self.count {
                    x = x.wrapping_mul(LCG_A).wrapping_add(LCG_C) & mask;
                    if x < self.count {
                        out.push(self.first_page + x * stride);
                    }
                }
                out
            }
        }
    }
}

fn op_code(op: StepOp) -> u32 {
    match op {
        StepOp::Read => OP_READ,
        StepOp::Write => OP_WRITE,
        StepOp::Flush => OP_FLUSH,
    }
}

/// The parameter header the probe reads; guest addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeHeader {
    pub region: u64,
    pub mmio: u64,
    pub avail: u64,
    pub used: u64,
    pub response: u64,
    pub queue_size: u16,
    pub control: u64,
}

impl ProbeHeader {
    pub fn encode(&self) -> [u8; STEPS_OFFSET] {
        let mut raw = [0u8; STEPS_OFFSET];
        for (at, v) in [
            (HDR_MAGIC, PROBE_MAGIC),
            (HDR_REGION, self.region),
            (HDR_MMIO, self.mmio),
            (HDR_AVAIL, self.avail),
            (HDR_USED, self.used),
            (HDR_RESPONSE, self.response),
            (HDR_QUEUE_MASK, u64::from(self.queue_size) - 1),
            (HDR_STEPS_DONE, 0),
            (HDR_CONTROL, self.control),
        ] {
            raw[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_small_and_ends_in_the_hang_loop() {
        let code = probe_code();
        assert!(code.len() > 64 && code.len() < 4096, "{}", code.len());
        // pause (f3 90) then a short jmp back to it (eb fc).
        assert_eq!(&code[code.len() - 4..], &[0xf3, 0x90, 0xeb, 0xfc]);
    }

    #[test]
    fn every_vector_has_a_stub_that_pushes_it() {
        let code = probe_code();
        let base = vectors_offset();
        assert_eq!(base % VECTOR_STUB, 0);
        let with_error = [8u8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
        for v in 0..VECTORS {
            let stub = &code[base + v as usize * VECTOR_STUB..][..VECTOR_STUB];
            // push imm8 is 6a ib: the CPU's error code, or a pushed 0, then
            // the vector.
            let want: &[u8] = if with_error.contains(&v) {
                &[0x6a, v]
            } else {
                &[0x6a, 0, 0x6a, v]
            };
            assert_eq!(&stub[..want.len()], want, "vector {v}");
            // Then a jmp (short eb or near e9) to the common handler.
            assert!(matches!(stub[want.len()], 0xeb | 0xe9), "vector {v}");
        }
        assert!(base + VECTORS as usize * VECTOR_STUB < code.len());
        assert!(exception_name(6).starts_with("#UD"));
    }

    #[test]
    fn random_order_visits_every_page_once() {
        for count in [1u64, 5, 64, 100, 4096] {
            let step = StepSpec {
                op: StepOp::Read,
                count,
                first_page: 10,
                order: PageOrder::Random {
                    stride: 3,
                    seed: 42,
                },
            };
            let mut pages = step.pages();
            if count > 5 {
                assert_ne!(pages, (0..count).map(|i| 10 + 3 * i).collect::<Vec<_>>());
            }
            pages.sort_unstable();
            assert_eq!(pages, (0..count).map(|i| 10 + 3 * i).collect::<Vec<_>>());
            assert_eq!(step.window_pages(), 3 * count);
        }
    }

    #[test]
    fn steps_encode_at_the_offsets_the_probe_reads() {
        let step = StepSpec {
            op: StepOp::Write,
            count: 100,
            first_page: 7,
            order: PageOrder::Random {
                stride: 2,
                seed: 0x1234,
            },
        };
        let raw = step.encode(0x40_0000);
        let get = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap());
        assert_eq!(raw[STEP_OP], OP_WRITE as u8);
        assert_eq!(raw[STEP_ORDER], ORDER_RANDOM as u8);
        assert_eq!(get(STEP_COUNT), 100);
        assert_eq!(get(STEP_FIRST_PAGE), 7);
        assert_eq!(get(STEP_STRIDE), 2);
        assert_eq!(get(STEP_SPAN), 100);
        assert_eq!(get(STEP_MASK), 127);
        assert_eq!(get(STEP_SEED), 0x34);
        assert_eq!(get(STEP_RESULTS), 0x40_0000);
        let h = ProbeHeader {
            region: 1 << 32,
            mmio: 0xd000_0000,
            avail: 1,
            used: 2,
            response: 3,
            queue_size: 16,
            control: 4,
        }
        .encode();
        assert_eq!(
            u64::from_le_bytes(h[HDR_QUEUE_MASK..HDR_QUEUE_MASK + 8].try_into().unwrap()),
            15
        );
    }
}
