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
 * per field. FRAME_WINDOW bytes hold the fields of every version's frame; before 3.11 the window
 * reaches the first local too (f_localsplus[0], at most FRAME_WINDOW_MAX - 8): a PyFrameObject
 * always holds it, and one longer read costs less than a second one. */
#define FRAME_WINDOW 128
#define FRAME_WINDOW_MAX 512
struct frame_win {
    u8 b[FRAME_WINDOW_MAX];
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
    /* 2.7: the last type checked for `instance` (old-style instances) and the answer. */
    u64 last_type;
    u32 last_old;
    /* The window holds the current frame's first win_len bytes (a frame at the very end of a
     * mapping cannot be read as a whole: then field by field). */
    u32 win_ok;
    u32 win_len;
};

/* A field of the current frame: from the window when it lies inside, else read. */
static __always_inline int frame_field(struct fctx *x, void *dst, s32 size, s32 off)
{
    if (x->win_ok && off >= 0 && off <= FRAME_WINDOW_MAX - size && off + size <= x->win_len) {
        __builtin_memcpy(dst, &x->win->b[off], size);
        return 0;
    }
    return rd(dst, size, x->frame + off);
}

/* 3.6 - 3.10: argument 0 of a frame whose slot is empty, from its cell: a closure (lambda,
 * comprehension) that uses `self` makes it a cell variable; the interpreter then moves the
 * argument into a new cell, local co_nlocals + i where co_cell2arg[i] == 0, and clears the
 * slot. Only the first CELL_SCAN cells are looked at. */
#define CELL_SCAN 8
static __always_inline u64 arg0_from_cell(struct proc_cfg *c, u64 frame, u64 code)
{
    u64 map = 0, cells = 0, n = 0, cell = 0, obj = 0;
    s32 nlocals = 0;
    if (c->code_cell2arg < 0 || rd(&map, 8, code + c->code_cell2arg) || !map)
        return 0;
    if (rd(&cells, 8, code + c->code_cellvars) || !cells || rd(&n, 8, cells + 16) || !n)
        return 0;
    if (rd(&nlocals, 4, code + c->code_nlocals) || nlocals < 0 || nlocals > 65536)
        return 0;
    if (n > CELL_SCAN)
        n = CELL_SCAN;
    u64 ent[CELL_SCAN] = {};
    u32 esz = c->cell2arg_entry == 1 ? 1 : 8;
    u32 bytes = (u32)n * esz;
    if (bytes > sizeof(ent) || rd(ent, bytes, map))
        return 0;
    u8 *b = (u8 *)ent;
    s32 idx = -1;
    for (int i = 0; i < CELL_SCAN; i++) {
        if (i >= n)
            break;
        if ((esz == 1 && b[i] == 0) || (esz == 8 && ent[i] == 0)) {
            idx = i;
            break;
        }
    }
    if (idx < 0)
        return 0;
    /* PyCellObject: the object header, then ob_ref. */
    if (rd(&cell, 8, frame + c->frame_localsplus + ((u64)nlocals + idx) * 8) || !cell ||
        rd(&obj, 8, cell + 16))
        return 0;
    return obj;
}

/* What names the class of `obj` (a method's first argument) at the sample: its type, long-lived
 * where the object may not be; for a 2.7 old-style instance (type `instance`) its in_class. */
static __always_inline u64 class_of(struct fctx *x, u64 obj)
{
    struct proc_cfg *c = x->c;
    u64 ty = 0;
    if (rd(&ty, 8, obj + 8) || !ty)
        return 0;
    if (c->instance_class < 0)
        return ty;
    if (ty != x->last_type) {
        /* tp_name (after the PyVarObject header) == "instance". */
        u64 name = 0, word = 0;
        u8 end = 1;
        x->last_type = ty;
        x->last_old = !rd(&name, 8, ty + 24) && name && !rd(&word, 8, name) &&
                      !rd(&end, 1, name + 8) && word == 0x65636e6174736e69ULL /* "instance" */ &&
                      end == 0;
    }
    if (!x->last_old)
        return ty;
    u64 cls = 0;
    rd(&cls, 8, obj + c->instance_class);
    return cls;
}

static long walk_frame(u32 i, struct fctx *x)
{
    struct proc_cfg *c = x->c;
    struct record *r = x->r;
    u8 owner = 0;
    u64 prev = 0;
    if (!x->frame)
        return 1;
    u32 len = x->win_len;
    if (len > FRAME_WINDOW_MAX)
        len = FRAME_WINDOW_MAX;
    x->win_ok = !rd(x->win->b, len, x->frame);
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
         * a local of the eval function, it tells user space which native frame runs the group.
         * Only the first one under a frame counts: from 3.15 the thread's own base frame (in its
         * thread state, owned by INTERPRETER too) ends every chain, under the outermost call's
         * shim, and is not on the C stack. */
        if (n > 0 && n <= max_py_frames && !(r->frames[n - 1].flags & FRAME_ENTRY)) {
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
    f->self_class = 0;
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
    if (c->frame_localsplus >= 0) {
        u64 local = 0;
        frame_field(x, &local, 8, c->frame_localsplus);
        if (!local && f->code)
            local = arg0_from_cell(c, x->frame, f->code);
        if (local) {
            f->first_local = local;
            f->self_class = class_of(x, local);
        }
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

/* The pid and tid of the current task as perfpy sees them (its own PID namespace); 1 when the
 * task lies outside that namespace. */
static __always_inline int current_ids(u32 *pid, u32 *tid)
{
    if (in_child_pidns) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(pidns_dev, pidns_ino, &ns, sizeof(ns)))
            return 1;
        *pid = ns.tgid;
        *tid = ns.pid;
    } else {
        u64 pt = bpf_get_current_pid_tgid();
        *pid = pt >> 32;
        *tid = (u32)pt;
    }
    return 0;
}

/* Whether the samples of process `pid` are kept (always without the filter). */
static __always_inline int is_kept(u32 pid)
{
    if (!filter_kept)
        return 1;
    struct kept *k = bpf_map_lookup_elem(&kept, &pid);
    return k && !(k->flags & KEEP_FROM_EXEC);
}

/* Walks the current thread's Python frames into `r` (pid, tid and time already set): the one
 * walk of both CPU samples and off-CPU waits. */
static __always_inline void walk_python(struct proc_cfg *c, struct record *r)
{
    r->nframes = 0;
    r->flags = 0;
    u64 interp = 0, ts = 0;
    if (rd(&interp, 8, c->runtime + c->runtime_interp_head) || !interp ||
        rd(&ts, 8, interp + c->interp_tstate_head)) {
        r->flags = REC_READ_ERROR;
        return;
    }
    u64 fsbase = 0;
    u32 own_tid = r->tid;
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
        return;
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
        return;
    struct fctx x = { .c = c, .r = r, .win = win, .frame = frame, .win_len = FRAME_WINDOW };
    if (c->frame_localsplus >= 0 && c->frame_localsplus <= FRAME_WINDOW_MAX - 8)
        x.win_len = c->frame_localsplus + 8;
    /* Each Python call under a perf trampoline (3.12+) also has an entry shim frame: twice the
     * frame limit, and a little more, lets the limit be what cuts. */
    bpf_loop(2 * max_py_frames + 2, walk_frame, &x, 0);
    /* Frames left when the loop's budget ran out: the outer ones are missing. */
    if (x.frame && !(x.flags & (REC_READ_ERROR | REC_TRUNCATED)))
        x.flags |= REC_LOOP_BUDGET;
    r->nframes = x.n;
    r->flags = x.flags;
}

SEC("perf_event")
int on_sample(void *ctx)
{
    u32 pid, tid;
    if (current_ids(&pid, &tid))
        return !filter_kept; /* a task outside our PID namespace */
    /* 0 drops the sample: not one of the processes profiled (yet). */
    if (!is_kept(pid))
        return 0;
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
    walk_python(c, r);
    emit(r);
    return 1;
}

/* ---- Off-CPU (--off-cpu) ----
 * sched_switch notes when a profiled thread leaves the CPU (its kernel stack then) and, when it
 * is switched in again, how long it waited. A thread blocked in a system call is stacked at the
 * system call's exit (tp_btf/sys_exit, in its own context, where its user registers and stack
 * are those it waited with): only waits of at least min_block_ns pay for the user stack copy
 * and the Python walk. A thread that left otherwise (preempted, a page fault) returns to user
 * space without such a point: it is stacked as it leaves, and its wait follows as an
 * OFFCPU_RESUME record. Kernel probes are not needed (this kernel may have none). */
const volatile u64 min_block_ns = 1000000;

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 16384);
    __type(key, u32); /* kernel tid */
    __type(value, struct offcpu_start);
} offcpu_start SEC(".maps");

/* A start built here (too big for the BPF stack), then stored. */
struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct offcpu_start);
} start_tmpl SEC(".maps");

/* Waits under min_block_ns, per thread: counted, not stacked. */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, u64); /* pid << 32 | tid, as perfpy sees them */
    __type(value, struct offcpu_short);
} offcpu_shorts SEC(".maps");

/* [0]: records the ring had no room for; [1]: short waits of threads the map had no room for. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, u32);
    __type(value, u64);
} offcpu_lost SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 1 << 12); /* sized at load */
} offcpu_events SEC(".maps");

/* One record per CPU (entries set at load: possible CPUs). Both programs run with interrupts
 * off (in the scheduler, and sys_exit's BPF programs do not nest with the sampling program's:
 * a perf_event program interrupting one is refused by the kernel's per-CPU recursion guard),
 * so the entry, the scratch record and the frame window have one user at a time. */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, struct offcpu_record);
} offcpu_scratch SEC(".maps");

/* How many waits ended long enough but are not stacked yet (START_WOKEN entries): while none,
 * sys_exit, which runs at every system call of every task, has nothing to look up. (An entry
 * the LRU map evicts leaves the count high: then only slower.) */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, u32);
    __type(value, s64);
} woken SEC(".maps");

static __always_inline void woken_add(s64 d)
{
    u32 zero = 0;
    s64 *n = bpf_map_lookup_elem(&woken, &zero);
    if (n)
        __sync_fetch_and_add(n, d);
}

static __always_inline void count_lost(u32 i)
{
    u64 *n = bpf_map_lookup_elem(&offcpu_lost, &i);
    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline void count_short(u32 pid, u32 tid, u64 wait)
{
    u64 key = ((u64)pid << 32) | tid;
    struct offcpu_short *s = bpf_map_lookup_elem(&offcpu_shorts, &key);
    if (s) {
        __sync_fetch_and_add(&s->count, 1);
        __sync_fetch_and_add(&s->ns, wait);
    } else {
        struct offcpu_short n = { .count = 1, .ns = wait };
        if (bpf_map_update_elem(&offcpu_shorts, &key, &n, BPF_NOEXIST))
            count_lost(1);
    }
}

struct uctx {
    struct offcpu_record *o;
    u64 sp;
};

/* Copies the user stack chunk by chunk until a read fails (the end of the stack's mapping). */
static long copy_user_chunk(u32 i, struct uctx *u)
{
    u32 off = (i & (OFFCPU_USTACK / OFFCPU_CHUNK - 1)) * OFFCPU_CHUNK;
    if (bpf_probe_read_user(&u->o->ustack[off], OFFCPU_CHUNK, (const void *)(u->sp + off)))
        return 1;
    u->o->h.ustack_bytes = off + OFFCPU_CHUNK;
    return 0;
}

/* Takes the current thread's stacks (user registers `regs`, kernel stack of `st`) and emits
 * them, with its Python frames first. */
static __always_inline void stack_wait(struct offcpu_start *st, struct pt_regs *regs, u64 wait,
                                       u64 runq, u32 flags)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct offcpu_record *o = bpf_map_lookup_elem(&offcpu_scratch, &cpu);
    if (!o)
        return;
    u64 now = bpf_ktime_get_ns();
    o->h.pid = st->pid;
    o->h.tid = st->tid;
    o->h.time = now;
    o->h.wait_ns = wait;
    o->h.runq_ns = runq;
    o->h.state = st->state;
    o->h.flags = flags;
    u32 kb = st->kstack_bytes;
    if (kb > sizeof(o->kstack))
        kb = sizeof(o->kstack);
    o->h.kstack_bytes = kb;
    __builtin_memcpy(o->kstack, st->kstack, sizeof(o->kstack));
    o->h.ip = BPF_CORE_READ(regs, ip);
    o->h.sp = BPF_CORE_READ(regs, sp);
    o->h.bp = BPF_CORE_READ(regs, bp);
    o->h.ustack_bytes = 0;
    struct uctx u = { .o = o, .sp = o->h.sp };
    bpf_loop(OFFCPU_USTACK / OFFCPU_CHUNK, copy_user_chunk, &u, 0);
    u32 pid = st->pid;
    struct proc_cfg *c = bpf_map_lookup_elem(&procs, &pid);
    if (c) {
        struct record *r = bpf_map_lookup_elem(&scratch, &cpu);
        if (r) {
            r->pid = st->pid;
            r->tid = st->tid;
            r->time = now;
            walk_python(c, r);
            r->flags |= REC_OFFCPU;
            emit(r);
            o->h.flags |= OFFCPU_HAS_PY;
        }
    }
    u32 n = o->h.ustack_bytes;
    if (n > OFFCPU_USTACK)
        n = OFFCPU_USTACK;
    if (bpf_ringbuf_output(&offcpu_events, o, __builtin_offsetof(struct offcpu_record, ustack) + n, 0))
        count_lost(0);
}

/* A profiled thread leaves the CPU (it is the current task here). */
static __always_inline void switch_out(u64 *ctx, struct task_struct *prev, u64 now)
{
    if (BPF_CORE_READ(prev, flags) & PF_KTHREAD)
        return;
    u32 pid, tid;
    if (current_ids(&pid, &tid) || !pid || !is_kept(pid))
        return;
    u32 ktid = BPF_CORE_READ(prev, pid);
    struct offcpu_start *st = bpf_map_lookup_elem(&offcpu_start, &ktid);
    if (st && (st->flags & START_WOKEN) && (st->flags & START_IN_SYSCALL) && !ctx[0]) {
        /* Blocks again in the system call whose long wait is not stacked yet: one wait. */
        st->ts = now;
        st->woke = 0;
        st->flags &= ~START_WOKEN;
        woken_add(-1);
        return;
    }
    if (st && (st->flags & START_WOKEN)) {
        /* Preempted before the system call whose long wait ended returned (a thread woken by a
         * lock's release often is): that wait is stacked now, in the thread's own context as
         * at sys_exit, before its entry is replaced. */
        stack_wait(st, (struct pt_regs *)bpf_task_pt_regs(prev), st->wait, st->runq, 0);
        woken_add(-1);
    }
    u32 zero = 0;
    struct offcpu_start *n = bpf_map_lookup_elem(&start_tmpl, &zero);
    if (!n)
        return;
    n->ts = now;
    n->wait = 0;
    n->runq = 0;
    n->woke = 0;
    n->pid = pid;
    n->tid = tid;
    n->state = ctx[0] ? 0 : BPF_CORE_READ(prev, __state);
    n->flags = 0;
    n->kstack_bytes = 0;
    /* Blocked in a system call: its entry left -ENOSYS in ax (the return value to come) and
     * the call's number in orig_ax. Then nothing more now: the stacks are taken only if the
     * wait turns out long. Otherwise (preempted, a page fault) they are taken now. */
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(prev);
    if (!ctx[0] && (long)BPF_CORE_READ(regs, orig_ax) >= 0 && (long)BPF_CORE_READ(regs, ax) == -38) {
        n->flags = START_IN_SYSCALL;
        bpf_map_update_elem(&offcpu_start, &ktid, n, 0);
        return;
    }
    n->flags = START_PENDING;
    bpf_map_update_elem(&offcpu_start, &ktid, n, 0);
    st = bpf_map_lookup_elem(&offcpu_start, &ktid);
    if (!st)
        return;
    /* The first two frames are this program and the tracepoint runner. */
    long kb = bpf_get_stack(ctx, st->kstack, sizeof(st->kstack), 2);
    st->kstack_bytes = kb > 0 ? kb : 0;
    stack_wait(st, regs, 0, 0, OFFCPU_PENDING);
}

/* A profiled thread is switched in again (`next`; the current task is the one leaving). */
static __always_inline void switch_in(struct task_struct *next, u64 now)
{
    u32 ktid = BPF_CORE_READ(next, pid);
    struct offcpu_start *st = bpf_map_lookup_elem(&offcpu_start, &ktid);
    if (!st || (st->flags & START_WOKEN))
        return;
    u64 wait = st->wait + (now - st->ts);
    /* Runnable since it was woken (or all along, preempted): waiting for a CPU, not for what
     * it blocked on. */
    u64 from = !st->state ? st->ts : st->woke;
    u64 runq = st->runq + (from >= st->ts && from <= now ? now - from : 0);
    if (st->flags & START_PENDING) {
        if (wait < min_block_ns)
            count_short(st->pid, st->tid, wait);
        struct offcpu_head r = {
            .pid = st->pid, .tid = st->tid, .time = now, .wait_ns = wait, .runq_ns = runq,
            .flags = OFFCPU_RESUME | (st->flags & START_BIRTH ? OFFCPU_BIRTH : 0)
        };
        if (bpf_ringbuf_output(&offcpu_events, &r, sizeof(r), 0))
            count_lost(0);
        bpf_map_delete_elem(&offcpu_start, &ktid);
    } else if (wait < min_block_ns && !st->wait) {
        count_short(st->pid, st->tid, wait);
        bpf_map_delete_elem(&offcpu_start, &ktid);
    } else {
        /* A long wait in a system call: its kernel stack now, from __schedule (the thread has
         * not run since it blocked), the rest at the call's exit. */
        if (!st->kstack_bytes) {
            long kb = bpf_get_task_stack(next, st->kstack, sizeof(st->kstack), 0);
            st->kstack_bytes = kb > 0 ? kb : 0;
        }
        st->wait = wait;
        st->runq = runq;
        st->flags |= START_WOKEN;
        woken_add(1);
    }
}

SEC("tp_btf/sched_switch")
int on_switch(u64 *ctx)
{
    u64 now = bpf_ktime_get_ns();
    switch_out(ctx, (void *)ctx[1], now);
    switch_in((void *)ctx[2], now);
    return 0;
}

/* A profiled thread off the CPU is woken: from now on it waits for a CPU, not for what it
 * blocked on (the first wake-up counts). */
SEC("tp_btf/sched_wakeup")
int on_wakeup(u64 *ctx)
{
    struct task_struct *p = (void *)ctx[0];
    u32 ktid = BPF_CORE_READ(p, pid);
    struct offcpu_start *st = bpf_map_lookup_elem(&offcpu_start, &ktid);
    if (st && !(st->flags & START_WOKEN) && !st->woke)
        st->woke = bpf_ktime_get_ns();
    return 0;
}

/* A thread whose wait in this system call was long enough returns from it: stacked here. */
SEC("tp_btf/sys_exit")
int on_sys_exit(u64 *ctx)
{
    u32 zero = 0;
    s64 *n = bpf_map_lookup_elem(&woken, &zero);
    if (!n || *n <= 0)
        return 0;
    struct task_struct *task = bpf_get_current_task_btf();
    u32 ktid = BPF_CORE_READ(task, pid);
    struct offcpu_start *st = bpf_map_lookup_elem(&offcpu_start, &ktid);
    if (!st || !(st->flags & START_WOKEN))
        return 0;
    stack_wait(st, (struct pt_regs *)ctx[0], st->wait, st->runq, 0);
    bpf_map_delete_elem(&offcpu_start, &ktid);
    woken_add(-1);
    return 0;
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

/* The pid (or tid) of `task` in perfpy's PID namespace, 0 if it has none there. */
static __always_inline u32 nr_in_our_ns(struct task_struct *task)
{
    struct pid *p = BPF_CORE_READ(task, thread_pid);
    if (!p)
        return 0;
    struct nsctx x = { .p = p, .nr = 0 };
    bpf_loop((BPF_CORE_READ(p, level) & 31) + 1, ns_level, &x, 0);
    return x.nr;
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
        cpid = nr_in_our_ns(child);
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

/* A new thread of a kept process waits for its first CPU before it ever leaves one: noted here,
 * in its creator's context, as a preempted wait without a stack (OFFCPU_BIRTH when it runs). */
SEC("tp_btf/sched_wakeup_new")
int on_wakeup_new(u64 *ctx)
{
    struct task_struct *p = (void *)ctx[0];
    u32 ktid = BPF_CORE_READ(p, pid);
    if (ktid == (u32)BPF_CORE_READ(p, tgid))
        return 0; /* a new process: its first run is its exec's */
    u32 pid, tid;
    if (current_ids(&pid, &tid) || !pid || !is_kept(pid))
        return 0;
    tid = in_child_pidns ? nr_in_our_ns(p) : ktid;
    if (!tid)
        return 0;
    u32 zero = 0;
    struct offcpu_start *n = bpf_map_lookup_elem(&start_tmpl, &zero);
    if (!n)
        return 0;
    n->ts = bpf_ktime_get_ns();
    n->wait = 0;
    n->runq = 0;
    n->woke = 0;
    n->pid = pid;
    n->tid = tid;
    n->state = 0;
    n->flags = START_PENDING | START_BIRTH;
    n->kstack_bytes = 0;
    bpf_map_update_elem(&offcpu_start, &ktid, n, 0);
    return 0;
}

char LICENSE[] SEC("license") = "GPL";
