// SPDX-License-Identifier: GPL-2.0
/* perfpy's eBPF frame walker for CPython 2.7 and 3.6+: at each sample of a registered process,
 * find the sampled thread's PyThreadState (the interpreter's thread list, matched on
 * native_thread_id, or on thread_id = the thread's fsbase before 3.11) and walk its frame chain
 * (_PyInterpreterFrame from 3.11, PyFrameObject before), emitting (code object, instruction
 * pointer, flags) per frame, newest first. Always returns 1: 0 would drop the perf sample.
 * One bpf_loop iteration per frame (walk_frame, which reads each frame's fields through
 * frame_field), up to max_py_frames frames (--max-python-frames, set by user space). */
#include "types.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "walker.h"

/* perfpy's own PID namespace, when it is not the initial one: pids and tids are then reported
 * as perfpy (and its perf events) see them. In the initial namespace the plain helper gives
 * exactly that, for containers' processes too. Set before loading. */
const volatile u64 pidns_dev = 0;
const volatile u64 pidns_ino = 0;
const volatile u8 in_child_pidns = 0;
/* Most Python frames in a record (--max-python-frames). The verifier knows this read-only
 * value, so it bounds every index into the scratch record; the scratch map's value size is set
 * to hold exactly this many frames. */
const volatile u32 max_py_frames = DEFAULT_PY_FRAMES;

/* -p and launched commands sample every CPU (so that a thread or process living less than a
 * period is sampled in proportion to its CPU time) and keep only the samples of the processes
 * in `kept` (pids as perfpy sees them), followed through fork by on_fork below. */
const volatile u8 filter_kept = 0;

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 32768);
    __type(key, u32);
    __type(value, struct kept);
} kept SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, u32);
    __type(value, struct proc_cfg);
} procs SEC(".maps");

/* Sized at load time from the number of CPUs (see Walker::load). Records are only as long as
 * their frames: most stacks are a few frames deep, so a small ring absorbs a long pause of the
 * reader. */
struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 20);
} events SEC(".maps");

/* The record is built here, then copied into the ring with only its used frames. One entry
 * per CPU, indexed by the CPU: a per-CPU array's value is limited to 32 KiB, less than 1,024
 * frames. A perf_event program does not nest on its CPU, so an entry has one user at a time.
 * Entries and value size are set at load time (number of CPUs, max_py_frames). */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __uint(key_size, sizeof(u32));
    __uint(value_size, sizeof(struct record) + DEFAULT_PY_FRAMES * sizeof(struct pyframe));
} scratch SEC(".maps");

/* The first bytes of the frame being walked, read at once: one read per frame instead of one
 * per field (the fields of every version's frame are within it but f_localsplus before 3.11). */
#define FRAME_WINDOW 128
struct frame_win {
    u8 b[FRAME_WINDOW];
};
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct frame_win);
} window SEC(".maps");

static __always_inline void emit(struct record *r)
{
    u32 n = r->nframes;
    if (n > max_py_frames)
        n = max_py_frames;
    bpf_ringbuf_output(&events, r, sizeof(struct record) + (u64)n * sizeof(struct pyframe), 0);
}

static __always_inline int rd(void *dst, u32 size, u64 addr)
{
    return bpf_probe_read_user(dst, size, (const void *)addr);
}

/* bpf_loop callbacks: the verifier checks each body once, whatever the number of iterations. */
struct tctx {
    struct proc_cfg *c;
    u64 ts;
    u64 found;
    u64 fsbase;
    u32 tid;
};

static long find_thread(u32 i, struct tctx *t)
{
    u64 id = 0;
    if (!t->ts)
        return 1;
    if (t->c->tstate_native_tid >= 0) {
        if (rd(&id, 8, t->ts + t->c->tstate_native_tid))
            return 1;
        id = (u32)id;
    } else if (rd(&id, 8, t->ts + t->c->tstate_thread_id)) {
        return 1;
    }
    if (id == (t->c->tstate_native_tid >= 0 ? (u64)t->tid : t->fsbase)) {
        t->found = t->ts;
        return 1;
    }
    if (rd(&t->ts, 8, t->ts + t->c->tstate_next))
        return 1;
    return 0;
}

struct fctx {
    struct proc_cfg *c;
    struct record *r;
    struct frame_win *win;
    u64 frame;
    u32 n;
    u32 flags;
    /* The last code object read and its identity: recursion repeats code objects, and one
     * alive in two frames of the same walk is the same object. */
    u64 last_code;
    u64 last_ident;
    /* The window holds the current frame's first FRAME_WINDOW bytes (a frame at the very end
     * of a mapping cannot be read as a whole: then field by field). */
    u32 win_ok;
};

/* A field of the current frame: from the window when it lies inside, else read. */
static __always_inline int frame_field(struct fctx *x, void *dst, s32 size, s32 off)
{
    if (x->win_ok && off >= 0 && off <= FRAME_WINDOW - size) {
        __builtin_memcpy(dst, &x->win->b[off], size);
        return 0;
    }
    return rd(dst, size, x->frame + off);
}

static long walk_frame(u32 i, struct fctx *x)
{
    struct proc_cfg *c = x->c;
    struct record *r = x->r;
    u8 owner = 0;
    u64 prev = 0;
    if (!x->frame)
        return 1;
    x->win_ok = !rd(x->win->b, FRAME_WINDOW, x->frame);
    if ((c->frame_owner >= 0 && frame_field(x, &owner, 1, c->frame_owner)) ||
        frame_field(x, &prev, 8, c->frame_previous)) {
        x->flags |= REC_READ_ERROR;
        return 1;
    }
    u32 n = x->n;
    if (c->owned_by_cstack >= 0 && owner >= (u8)c->owned_by_cstack) {
        /* A C-level eval call starts here (3.12, 3.13: owned by CSTACK; 3.14+: by INTERPRETER,
         * both 3; higher owners are not Python frames either): the frame above it is its entry
         * frame. That frame's first_local (unused from 3.11 on) gets this shim frame's address:
         * a local of the eval function, it tells user space which native frame runs the group. */
        if (n > 0 && n <= max_py_frames) {
            r->frames[n - 1].flags |= FRAME_ENTRY;
            r->frames[n - 1].first_local = x->frame;
        }
        x->frame = prev;
        return 0;
    }
    if (n >= max_py_frames) {
        x->flags |= REC_TRUNCATED;
        return 1;
    }
    struct pyframe *f = &r->frames[n];
    f->code = 0;
    f->instr = 0;
    f->first_local = 0;
    if (c->frame_localsplus >= 0)
        frame_field(x, &f->first_local, 8, c->frame_localsplus);
    frame_field(x, &f->code, 8, c->frame_code);
    if (c->code_tagged) {
        /* A _PyStackRef: the low two bits are tags; both set is a tagged int, not an object. */
        if ((f->code & 3) == 3) {
            x->frame = prev;
            return 0;
        }
        f->code &= ~(u64)3;
    }
    /* The code object's identity at the sample instant: its address alone may meanwhile hold
     * another code object (the first one freed), whose name user space would otherwise give. */
    if (f->code && f->code == x->last_code) {
        f->ident = x->last_ident;
    } else {
        u64 name = 0, file = 0;
        if (f->code) {
            rd(&name, 8, f->code + c->code_name);
            rd(&file, 8, f->code + c->code_filename);
        }
        f->ident = name ^ ((file << 1) | (file >> 63));
        x->last_code = f->code;
        x->last_ident = f->ident;
    }
    f->flags = owner;
    f->pad = 0;
    if (c->lasti_int) {
        /* <= 3.10: f_lasti, and every Python call has its own C-level eval call. */
        s32 lasti = 0;
        frame_field(x, &lasti, 4, c->frame_instr);
        f->instr = (u64)(s64)lasti;
        f->flags |= FRAME_ENTRY;
    } else {
        frame_field(x, &f->instr, 8, c->frame_instr);
    }
    if (c->frame_is_entry >= 0) {
        u8 e = 0;
        if (!frame_field(x, &e, 1, c->frame_is_entry) && e)
            f->flags |= FRAME_ENTRY;
    }
    x->n++;
    x->frame = prev;
    return 0;
}

SEC("perf_event")
int on_sample(void *ctx)
{
    u32 pid, tid;
    if (in_child_pidns) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
            return !filter_kept; /* a task outside our PID namespace */
        pid = ns.tgid;
        tid = ns.pid;
    } else {
        u64 pt = bpf_get_current_pid_tgid();
        pid = pt >> 32;
        tid = (u32)pt;
    }
    /* 0 drops the sample: not one of the processes profiled (yet). */
    if (filter_kept) {
        struct kept *k = bpf_map_lookup_elem(&kept, &pid);
        if (!k || (k->flags & KEEP_FROM_EXEC))
            return 0;
    }
    struct proc_cfg *c = bpf_map_lookup_elem(&procs, &pid);
    if (!c)
        return 1;
    u32 cpu = bpf_get_smp_processor_id();
    struct record *r = bpf_map_lookup_elem(&scratch, &cpu);
    if (!r)
        return 1;
    r->pid = pid;
    r->tid = tid;
    r->time = bpf_ktime_get_ns();
    r->nframes = 0;
    r->flags = 0;

    u64 interp = 0, ts = 0;
    if (rd(&interp, 8, c->runtime + c->runtime_interp_head) || !interp ||
        rd(&ts, 8, interp + c->interp_tstate_head)) {
        r->flags = REC_READ_ERROR;
        emit(r);
        return 1;
    }
    u64 fsbase = 0;
    u32 own_tid = tid;
    struct task_struct *task = (void *)bpf_get_current_task();
    if (c->tstate_native_tid < 0) {
        fsbase = BPF_CORE_READ(task, thread.fsbase);
    } else {
        /* native_thread_id is gettid() inside the target: its innermost PID namespace. */
        struct pid *tp = BPF_CORE_READ(task, thread_pid);
        unsigned int level = BPF_CORE_READ(tp, level);
        int nr = 0;
        u64 at = (u64)tp + bpf_core_field_offset(struct pid, numbers) +
                 (u64)(level & 31) * bpf_core_type_size(struct upid) + bpf_core_field_offset(struct upid, nr);
        if (!bpf_probe_read_kernel(&nr, sizeof(nr), (void *)at))
            own_tid = nr;
    }
    struct tctx t = { .c = c, .ts = ts, .found = 0, .fsbase = fsbase, .tid = own_tid };
    bpf_loop(MAX_THREADS, find_thread, &t, 0);
    if (!t.found) {
        r->flags = REC_NO_TSTATE;
        emit(r);
        return 1;
    }
    u64 frame = 0;
    if (c->tstate_cframe >= 0) {
        u64 cf = 0;
        if (!rd(&cf, 8, t.found + c->tstate_cframe) && cf)
            rd(&frame, 8, cf + c->tstate_current_frame);
    } else {
        rd(&frame, 8, t.found + c->tstate_current_frame);
    }
    u32 zero = 0;
    struct frame_win *win = bpf_map_lookup_elem(&window, &zero);
    if (!win)
        return 1;
    struct fctx x = { .c = c, .r = r, .win = win, .frame = frame };
    /* Each Python call under a perf trampoline (3.12+) also has an entry shim frame: twice the
     * frame limit, and a little more, lets the limit be what cuts. */
    bpf_loop(2 * max_py_frames + 2, walk_frame, &x, 0);
    /* Frames left when the loop's budget ran out: the outer ones are missing. */
    if (x.frame && !(x.flags & (REC_READ_ERROR | REC_TRUNCATED)))
        x.flags |= REC_LOOP_BUDGET;
    r->nframes = x.n;
    r->flags = x.flags;
    emit(r);
    return 1;
}

/* The pid of `task` in perfpy's PID namespace (a child namespace: one of its upids). */
struct nsctx {
    struct pid *p;
    u32 nr;
};

static long ns_level(u32 i, struct nsctx *x)
{
    struct pid *p = x->p;
    struct upid *u = (void *)((u64)p + bpf_core_field_offset(struct pid, numbers) +
                              (u64)i * bpf_core_type_size(struct upid));
    struct pid_namespace *ns = BPF_CORE_READ(u, ns);
    if (ns && BPF_CORE_READ(ns, ns.inum) == (unsigned int)pidns_ino) {
        x->nr = BPF_CORE_READ(u, nr);
        return 1;
    }
    return 0;
}

/* A new process whose parent is kept with KEEP_CHILDREN is kept too, and walked as its parent
 * (same address space until it execs). Runs in the parent, before the child first runs. Only
 * loaded with filter_kept. */
SEC("tp_btf/sched_process_fork")
int on_fork(u64 *ctx)
{
    struct task_struct *parent = (void *)ctx[0], *child = (void *)ctx[1];
    if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
        return 0; /* a thread: kept with its process */
    u32 ppid, cpid;
    if (in_child_pidns) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
            return 0;
        ppid = ns.tgid;
        struct pid *cp = BPF_CORE_READ(child, thread_pid);
        if (!cp)
            return 0;
        struct nsctx x = { .p = cp, .nr = 0 };
        bpf_loop((BPF_CORE_READ(cp, level) & 31) + 1, ns_level, &x, 0);
        cpid = x.nr;
        if (!cpid)
            return 0;
    } else {
        ppid = BPF_CORE_READ(parent, tgid);
        cpid = BPF_CORE_READ(child, pid);
    }
    struct kept *pk = bpf_map_lookup_elem(&kept, &ppid);
    if (!pk || !(pk->flags & KEEP_CHILDREN)) {
        /* A kept process's pid, reused by another process after it exited: not ours. */
        bpf_map_delete_elem(&kept, &cpid);
        return 0;
    }
    struct kept k = { .parent = ppid, .flags = pk->flags & KEEP_CHILDREN };
    bpf_map_update_elem(&kept, &cpid, &k, 0);
    struct proc_cfg *c = bpf_map_lookup_elem(&procs, &ppid);
    if (c)
        bpf_map_update_elem(&procs, &cpid, c, 0);
    return 0;
}

/* A kept process that execs is another program: no frames walked until user space has read
 * its new interpreter. Only loaded with filter_kept. */
SEC("tp_btf/sched_process_exec")
int on_exec(u64 *ctx)
{
    u32 pid;
    if (in_child_pidns) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
            return 0;
        pid = ns.tgid;
    } else {
        pid = bpf_get_current_pid_tgid() >> 32;
    }
    struct kept *k = bpf_map_lookup_elem(&kept, &pid);
    if (k) {
        bpf_map_delete_elem(&procs, &pid);
        k->flags &= ~KEEP_FROM_EXEC;
    }
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
