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
    __u64 first_local;
    __u64 ident; /* co_name pointer ^ rotl(co_filename pointer, 1): the code object's identity */
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
 * Rust type. They cost a 40-byte .bss map. */
struct record abi_record;
enum py_frame_limits abi_py_frame_limits;
enum record_flags abi_record_flags;
enum frame_flags abi_frame_flags;
enum keep_flags abi_keep_flags;

#endif
