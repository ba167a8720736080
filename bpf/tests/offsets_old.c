/* Offsets perfpy needs for CPython 2.7 and 3.6 – 3.10 (PyFrameObject), from each version's own headers (tests/offsets.rs). */
#define Py_BUILD_CORE 1
#include <Python.h>
#include <frameobject.h>
#include <stddef.h>
#include <stdio.h>
#if PY_MAJOR_VERSION >= 3 && PY_MINOR_VERSION == 7
#include "internal/pystate.h"
#elif PY_MAJOR_VERSION >= 3 && PY_MINOR_VERSION == 8
#include "internal/pycore_pystate.h"
#elif PY_MAJOR_VERSION >= 3 && PY_MINOR_VERSION >= 9
#include "internal/pycore_runtime.h"
#include "internal/pycore_interp.h"
#endif
int main(void) {
#if PY_MAJOR_VERSION >= 3 && PY_MINOR_VERSION >= 7
    printf("runtime_interp_head %zu\n", offsetof(_PyRuntimeState, interpreters.head));
#else
    printf("runtime_interp_head 0\n");
#endif
    printf("interp_tstate_head %zu\n", offsetof(PyInterpreterState, tstate_head));
    printf("tstate_next %zu\n", offsetof(PyThreadState, next));
    printf("tstate_native_tid -1\n");
    printf("tstate_thread_id %zu\n", offsetof(PyThreadState, thread_id));
    printf("tstate_frame %zu\n", offsetof(PyThreadState, frame));
    printf("frame_back %zu\n", offsetof(PyFrameObject, f_back));
    printf("frame_code %zu\n", offsetof(PyFrameObject, f_code));
    printf("frame_lasti %zu\n", offsetof(PyFrameObject, f_lasti));
    printf("frame_localsplus %zu\n", offsetof(PyFrameObject, f_localsplus));
    printf("code_varnames %zu\n", offsetof(PyCodeObject, co_varnames));
#if PY_MAJOR_VERSION >= 3
    printf("code_nlocals %zu\n", offsetof(PyCodeObject, co_nlocals));
    printf("code_cellvars %zu\n", offsetof(PyCodeObject, co_cellvars));
    printf("code_cell2arg %zu\n", offsetof(PyCodeObject, co_cell2arg));
    printf("cell2arg_entry %zu\n", sizeof(*((PyCodeObject *)0)->co_cell2arg));
#else
    printf("code_cell2arg -1\n");
#endif
    printf("tuple_items %zu\n", offsetof(PyTupleObject, ob_item));
    printf("type_name %zu\n", offsetof(PyTypeObject, tp_name));
    printf("code_name %zu\n", offsetof(PyCodeObject, co_name));
    printf("code_filename %zu\n", offsetof(PyCodeObject, co_filename));
    printf("code_firstlineno %zu\n", offsetof(PyCodeObject, co_firstlineno));
#if PY_MAJOR_VERSION >= 3 && PY_MINOR_VERSION >= 10
    printf("code_linetable %zu\n", offsetof(PyCodeObject, co_linetable));
#else
    printf("code_linetable %zu\n", offsetof(PyCodeObject, co_lnotab));
#endif
#if PY_MAJOR_VERSION >= 3
    printf("unicode_ascii_data %zu\n", sizeof(PyASCIIObject));
    printf("unicode_compact_data %zu\n", sizeof(PyCompactUnicodeObject));
    printf("unicode_state %zu\n", offsetof(PyASCIIObject, state));
    printf("bytes_data %zu\n", offsetof(PyBytesObject, ob_sval));
#else
    printf("unicode_ascii_data %zu\n", offsetof(PyStringObject, ob_sval));
    printf("unicode_compact_data -1\n");
    printf("unicode_state -1\n");
    printf("bytes_data %zu\n", offsetof(PyStringObject, ob_sval));
#endif
    return 0;
}
