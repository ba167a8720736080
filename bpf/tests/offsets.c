/* Prints the offsets perfpy needs, from this CPython version's own headers (tests/offsets.rs). */
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include "internal/pycore_runtime.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_frame.h"
#include "internal/pycore_code.h"
#include <stdio.h>
int main(void) {
    printf("runtime_interp_head %zu\n", offsetof(_PyRuntimeState, interpreters.head));
#if PY_VERSION_HEX >= 0x030c0000
    printf("interp_tstate_head %zu\n", offsetof(PyInterpreterState, threads.head));
#else
    printf("interp_tstate_head %zu\n", offsetof(PyInterpreterState, threads.head));
#endif
    printf("tstate_next %zu\n", offsetof(PyThreadState, next));
    printf("tstate_native_tid %zu\n", offsetof(PyThreadState, native_thread_id));
    printf("tstate_thread_id %zu\n", offsetof(PyThreadState, thread_id));
#if PY_VERSION_HEX >= 0x030d0000
    printf("tstate_cframe -1\n");
    printf("tstate_current_frame %zu\n", offsetof(PyThreadState, current_frame));
    printf("frame_code %zu\n", offsetof(_PyInterpreterFrame, f_executable));
    printf("frame_instr %zu\n", offsetof(_PyInterpreterFrame, instr_ptr));
    printf("frame_is_entry -1\n");
#else
    printf("tstate_cframe %zu\n", offsetof(PyThreadState, cframe));
    printf("tstate_current_frame %zu\n", offsetof(_PyCFrame, current_frame));
    printf("frame_code %zu\n", offsetof(_PyInterpreterFrame, f_code));
    printf("frame_instr %zu\n", offsetof(_PyInterpreterFrame, prev_instr));
#if PY_VERSION_HEX < 0x030c0000
    printf("frame_is_entry %zu\n", offsetof(_PyInterpreterFrame, is_entry));
#else
    printf("frame_is_entry -1\n");
#endif
#endif
    printf("frame_previous %zu\n", offsetof(_PyInterpreterFrame, previous));
    printf("frame_owner %zu\n", offsetof(_PyInterpreterFrame, owner));
#if PY_VERSION_HEX >= 0x030c0000
    printf("owned_by_cstack %d\n", (int)FRAME_OWNED_BY_CSTACK);
#else
    printf("owned_by_cstack -1\n");
#endif
    printf("code_name %zu\n", offsetof(PyCodeObject, co_name));
    printf("code_qualname %zu\n", offsetof(PyCodeObject, co_qualname));
    printf("code_filename %zu\n", offsetof(PyCodeObject, co_filename));
    printf("code_firstlineno %zu\n", offsetof(PyCodeObject, co_firstlineno));
    printf("code_linetable %zu\n", offsetof(PyCodeObject, co_linetable));
    printf("code_adaptive %zu\n", offsetof(PyCodeObject, co_code_adaptive));
    printf("unicode_ascii_data %zu\n", sizeof(PyASCIIObject));
    printf("unicode_compact_data %zu\n", sizeof(PyCompactUnicodeObject));
    printf("unicode_state %zu\n", offsetof(PyASCIIObject, state));
    printf("bytes_data %zu\n", offsetof(PyBytesObject, ob_sval));
    return 0;
}
