/* Shared between the eBPF program and user space. Not mirrored by hand: libbpf-cargo generates
 * the Rust types (the skeleton's `types` module, used by src/abi.rs) from the program's BTF, so
 * every struct and enum here must be named and reach the BTF (see the instances at the end). */
#ifndef PERFPY_WALKER_H
#define PERFPY_WALKER_H

#define MAX_THREADS 256
/* Default and ceiling of the Python frames one record holds (user space sets the limit,
 * --max-python-frames, before loading; the scratch map's value is sized to match). */
enum py_frame_limits {
    DEFAULT_PY_FRAMES = 1024,
    MAX_PY_FRAMES_CAP = 16384,
};

/* Record flags. */
enum record_flags {
    REC_NO_TSTATE = 1,   /* the thread has no PyThreadState: no Python frames */
    REC_TRUNCATED = 2,   /* more Python frames than the limit (max_py_frames) */
    REC_READ_ERROR = 4,  /* a pointer could not be read */
    REC_LOOP_BUDGET = 8, /* the walk's loop budget ran out before the outermost frame */
    REC_OFFCPU = 16,     /* taken when the thread ran again after a wait (--off-cpu) */
};

/* Frame flags: low byte = owner; ENTRY = first frame run by its C-level eval call. */
enum frame_flags {
    FRAME_OWNER_MASK = 0xff,
    FRAME_ENTRY = 0x100,
};

/* Per process: where _PyRuntime (or interp_head: 2.7, 3.6) is, and the offsets of its CPython
 * version (-1 where a field does not exist in it). */
struct proc_cfg {
    __u64 runtime;
    __s32 runtime_interp_head;
    __s32 interp_tstate_head;
    __s32 tstate_next;
    __s32 tstate_native_tid;
    __s32 tstate_cframe;        /* -1: the current frame hangs off the thread state (3.13) */
    __s32 tstate_current_frame; /* in the cframe (3.11, 3.12) or the thread state (3.13) */
    __s32 frame_code;
    __s32 frame_instr;
    __s32 frame_previous;
    __s32 frame_owner;
    __s32 frame_is_entry;       /* -1 where absent (3.12+: entry frames sit on a C-stack frame) */
    __s32 owned_by_cstack;      /* owner value of C-stack shim frames, -1 where absent */
    __s32 tstate_thread_id;     /* pthread_t of the thread (= its fsbase), for versions without native_thread_id */
    __s32 lasti_int;            /* 1: frame_instr is an int f_lasti (<= 3.10), every frame an entry */
    __s32 frame_localsplus;     /* <= 3.10: the first local (self / cls), -1 where not read */
    __s32 code_name;            /* co_name and co_filename in the code object: together they */
    __s32 code_filename;        /* tell a code object from another one later at its address */
    __s32 code_tagged;          /* 1: f_executable is a _PyStackRef (3.14+): tag bits masked, tagged ints skipped */
    /* 3.6 - 3.10: a method's `self` captured by a closure is in a cell, its slot cleared:
     * cell i is local co_nlocals + i and holds argument co_cell2arg[i] (-1 where absent). */
    __s32 code_nlocals;
    __s32 code_cellvars;
    __s32 code_cell2arg;
    __s32 cell2arg_entry;       /* bytes per co_cell2arg entry: 1 (3.6), 8 (3.7 - 3.10) */
    __s32 instance_class;       /* 2.7: in_class of an old-style instance (type `instance`), else -1 */
    __s32 pad;
};

/* A process whose samples are kept (-p and launched commands on per-CPU events). */
enum keep_flags {
    KEEP_CHILDREN = 1,  /* processes it forks are kept too */
    KEEP_FROM_EXEC = 2, /* a launched command: its samples count from its exec on */
};
struct kept {
    __u32 parent; /* the kept process that forked it, 0 for a target */
    __u32 flags;
};

struct pyframe {
    __u64 code;
    __u64 instr;
    __u64 first_local; /* <= 3.10: the first argument (from its cell if a closure took it);
                        * 3.12+ entry frames: the shim frame under them */
    __u64 ident; /* co_name pointer ^ rotl(co_filename pointer, 1): the code object's identity */
    __u64 self_class; /* <= 3.10: what names first_local's class at the sample: its type, or a
                       * 2.7 old-style instance's class. `self` may be freed before user space
                       * reads the record; its type lives on. */
    __u32 flags;
    __u32 pad;
};

struct record {
    __u32 pid;
    __u32 tid;
    __u64 time;
    __u32 nframes;
    __u32 flags;
    struct pyframe frames[]; /* nframes of them, up to max_py_frames */
};

/* Never read nor written by the program: one instance of each type above that no map names, so
 * that clang puts it in the program's BTF (a struct reached only through a pointer member is
 * emitted as a bare forward declaration, and an enum not at all) and libbpf-cargo generates its
 * Rust type. They cost a small .bss map. */
struct record abi_record;
enum py_frame_limits abi_py_frame_limits;
enum record_flags abi_record_flags;
enum frame_flags abi_frame_flags;
enum keep_flags abi_keep_flags;

/* Waits shorter than the threshold, per thread. */
struct offcpu_short {
    __u64 count;
    __u64 ns;
};

enum offcpu_sizes {
    OFFCPU_KSTACK = 64,    /* kernel frames */
    OFFCPU_USTACK = 16384, /* bytes of user stack copied (as the CPU samples' default) */
    OFFCPU_CHUNK = 512,    /* copied chunk by chunk up to the end of the stack's mapping */
};

/* Off-CPU record flags. */
enum offcpu_flags {
    OFFCPU_HAS_PY = 1,  /* its Python frames went into `events` first (REC_OFFCPU, same tid and time) */
    OFFCPU_PENDING = 2, /* taken as the thread left the CPU; its wait follows in an OFFCPU_RESUME record */
    OFFCPU_RESUME = 4,  /* a bare head: the wait (wait_ns, runq_ns) of the last pending record of thread tid */
    OFFCPU_BIRTH = 8,   /* with OFFCPU_RESUME: a new thread's wait for its first CPU (no record before it) */
};

/* Off-CPU: a profiled thread that left the CPU, by kernel tid, until its wait is stacked. */
enum start_flags {
    START_IN_SYSCALL = 1, /* blocked in a system call: stacked at its exit, in the thread's context */
    START_WOKEN = 2,      /* ran again after a wait of at least the threshold */
    START_PENDING = 4,    /* stacked as it left (preempted, page fault): its wait is sent when it runs */
    START_BIRTH = 8,      /* a new thread, runnable since its creation, not run yet */
};
struct offcpu_start {
    __u64 ts;    /* when it last left the CPU */
    __u64 wait;  /* off-CPU time so far in this system call */
    __u64 runq;  /* of which runnable, waiting for a CPU (woken, or preempted) */
    __u64 woke;  /* when it was last woken (sched_wakeup), 0 before */
    __u32 pid;   /* as perfpy sees them */
    __u32 tid;
    __u32 state; /* the task's state as it left: 0 = preempted (still runnable) */
    __u32 flags; /* start_flags */
    __u32 kstack_bytes;
    __u32 pad;
    __u64 kstack[OFFCPU_KSTACK];
};

/* The fixed head of an off-CPU record, and alone an OFFCPU_RESUME record. */
struct offcpu_head {
    __u32 pid;
    __u32 tid;
    __u64 time;    /* when it ran again (CLOCK_MONOTONIC) */
    __u64 wait_ns; /* how long it was off the CPU */
    __u64 runq_ns; /* the part of it runnable, waiting for a CPU: woken and not yet running, or preempted */
    __u64 ip;      /* user registers at the wait */
    __u64 sp;
    __u64 bp;
    __u32 state;
    __u32 flags; /* offcpu_flags */
    __u32 kstack_bytes;
    __u32 ustack_bytes;
};

/* A wait of at least the threshold, emitted when the thread runs again; only the copied part of
 * the user stack goes into the ring. */
struct offcpu_record {
    struct offcpu_head h;
    __u64 kstack[OFFCPU_KSTACK];
    __u8 ustack[OFFCPU_USTACK];
};

/* In the BTF for libbpf-cargo, as those above. */
enum offcpu_sizes abi_offcpu_sizes;
enum offcpu_flags abi_offcpu_flags;
enum start_flags abi_start_flags;

#endif
