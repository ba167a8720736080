/* The few kernel types the walker needs; no vmlinux.h, so the build needs only clang. */
#ifndef PERFPY_TYPES_H
#define PERFPY_TYPES_H
typedef unsigned char __u8;
typedef signed char __s8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef signed int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
typedef __u8 u8;
typedef __u32 u32;
typedef __u64 u64;
typedef __s32 s32;
typedef __s64 s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;

/* For CO-RE: libbpf finds these fields in the running kernel's BTF. */
struct thread_struct {
    unsigned long fsbase;
} __attribute__((preserve_access_index));

struct ns_common {
    unsigned int inum;
} __attribute__((preserve_access_index));

struct pid_namespace {
    struct ns_common ns;
} __attribute__((preserve_access_index));

struct upid {
    int nr;
    struct pid_namespace *ns;
} __attribute__((preserve_access_index));

struct pid {
    unsigned int level;
    struct upid numbers[1];
} __attribute__((preserve_access_index));

struct task_struct {
    struct thread_struct thread;
    struct pid *thread_pid;
    int pid;
    int tgid;
    unsigned int flags;
    unsigned int __state;
} __attribute__((preserve_access_index));

/* The user registers of a task (x86-64), as bpf_task_pt_regs gives them. */
struct pt_regs {
    unsigned long bp;
    unsigned long ax;
    unsigned long orig_ax;
    unsigned long ip;
    unsigned long sp;
} __attribute__((preserve_access_index));

#define PF_KTHREAD 0x00200000
#define BPF_NOEXIST 1

struct bpf_pidns_info {
    __u32 pid;
    __u32 tgid;
};

enum bpf_map_type {
    BPF_MAP_TYPE_HASH = 1,
    BPF_MAP_TYPE_ARRAY = 2,
    BPF_MAP_TYPE_PERCPU_ARRAY = 6,
    BPF_MAP_TYPE_LRU_HASH = 9,
    BPF_MAP_TYPE_RINGBUF = 27,
};
#endif
